"""Test-suite root. Being here (a rootdir-level conftest outside any package) makes
pytest put ``tests/`` on ``sys.path``, so every test file can ``import helpers``."""
