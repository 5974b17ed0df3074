"""The systemd units of ``deploy/systemd/`` against the programs they start.

Each unit's ``ExecStart=`` is expanded as systemd does it (specifiers; then ``${VAR}``
inside a word, and ``$VAR`` alone split into words) with the unit's ``Environment=``
defaults and the values of ``lepton.env.example``, and parsed by the real ``lepton``
parser and by the programs' own argument functions with abbreviations refused: a
renamed or removed flag fails here, not at boot on a host. The restart policy is
checked against ``heal``'s exit code, and ``systemd-analyze verify``, where it is
installed, reads the files as systemd does.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest

from lepton_ai.cli import build_parser
from lepton_ai.consensus.server import parse_peers
from lepton_ai.heal.membership import EXIT_REMOVED
from lepton_ai.node.node_net import parse_address
from lepton_ai.node.programs import add_coordinator_args, add_worker_args
from lepton_ai.wire import resolve_token

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
COORDINATOR = DEPLOY / "lepton-coordinator@.service"
WORKER = DEPLOY / "lepton-worker@.service"
ENV_EXAMPLE = DEPLOY / "lepton.env.example"
ENV_FILE = "/etc/lepton/lepton.env"  # where the README installs the example
STATE_ROOT = "/var/lib"  # %S of a system unit

# `lepton SUBCOMMAND` and `python -m MODULE` start the same program.
MODULES = {"lepton_ai.node.coordinator": "coordinator", "lepton_ai.node.worker": "worker"}
ADD_ARGS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "coordinator": add_coordinator_args,
    "worker": add_worker_args,
}
# Keys that some supported systemd predates: its systemd-analyze warns and ignores them.
KEY_SINCE = {
    "RestartSteps": 254,
    "RestartMaxDelaySec": 254,
    "ProtectClock": 245,
    "ProtectKernelLogs": 244,
    "OOMPolicy": 243,
    "ProtectHostname": 242,
}
TIME_UNITS = {"ms": 0.001, "s": 1.0, "sec": 1.0, "min": 60.0, "": 1.0}


# ---------------------------------------------------------------- reading the files


@dataclass(frozen=True)
class Unit:
    path: Path
    entries: tuple[tuple[str, str, str], ...]  # (section, key, value) in file order

    def values(self, section: str, key: str) -> list[str]:
        return [v for s, k, v in self.entries if (s, k) == (section, key)]

    def value(self, section: str, key: str) -> str:
        found = self.values(section, key)
        assert len(found) == 1, f"{self.path.name}: [{section}] {key}= set {len(found)} times"
        return found[0]


def parse_unit(path: Path) -> Unit:
    """A unit file as systemd reads it: sections, comments, backslash continuations,
    and keys that may repeat (``Environment=``), which configparser would merge."""
    entries: list[tuple[str, str, str]] = []
    section, pending = "", ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue  # also inside a continuation, as systemd does
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep and section, f"{path.name}: not KEY=VALUE in a section: {raw!r}"
        entries.append((section, key.strip(), value.strip()))
    assert not pending, f"{path.name}: ends in a continuation"
    return Unit(path, tuple(entries))


def read_env_example() -> tuple[dict[str, str], dict[str, str]]:
    """The example's settings, and its optional ones (the ``#KEY=VALUE`` lines)."""
    settings: dict[str, str] = {}
    optional: dict[str, str] = {}
    for n, raw in enumerate(ENV_EXAMPLE.read_text().splitlines(), 1):
        line = raw.rstrip()
        if m := re.fullmatch(r"([A-Z][A-Z0-9_]*)=(.*)", line):
            settings[m[1]] = m[2]
        elif m := re.fullmatch(r"#([A-Z][A-Z0-9_]*)=(.*)", line):
            optional[m[1]] = m[2]
        else:
            assert line in ("", "#") or line.startswith("# "), f"{ENV_EXAMPLE.name}:{n}: {raw!r}"
    return settings, optional


def seconds(span: str) -> float:
    """A systemd time span such as ``500ms``, ``8s`` or ``1min``."""
    m = re.fullmatch(r"([0-9.]+)\s*(ms|s|sec|min|)", span)
    assert m, f"time span {span!r} not understood by this test"
    return float(m[1]) * TIME_UNITS[m[2]]


# ---------------------------------------------------------------- expanding ExecStart


def specifiers(text: str, instance: str) -> str:
    table = {"i": instance, "S": STATE_ROOT, "%": "%"}

    def one(m: re.Match[str]) -> str:
        assert m[1] in table, f"specifier %{m[1]} in {text!r}: teach this test its value"
        return table[m[1]]

    return re.sub(r"%(.)", one, text)


def environment(unit: Unit, instance: str, *, optional: bool) -> dict[str, str]:
    """What systemd gives the program: the unit's Environment=, then the env file
    (the example; with ``optional``, its commented settings too, as an instance's
    own file would add them)."""
    assert ENV_FILE in unit.values("Service", "EnvironmentFile"), unit.path.name
    env: dict[str, str] = {}
    for value in unit.values("Service", "Environment"):
        for item in shlex.split(specifiers(value, instance)):
            key, sep, val = item.partition("=")
            assert sep, f"{unit.path.name}: Environment={value}"
            env[key] = val
    settings, extra = read_env_example()
    env.update(settings)
    if optional:
        env.update(extra)
    return env


def exec_argv(unit: Unit, instance: str, env: dict[str, str]) -> list[str]:
    (line,) = unit.values("Service", "ExecStart")

    def lookup(name: str) -> str:
        if name not in env:
            pytest.fail(
                f"{unit.path.name}: ExecStart uses ${name}, set neither by the unit's "
                f"Environment= nor by {ENV_EXAMPLE.name}"
            )
        return env[name]

    words = shlex.split(specifiers(line, instance))
    words[0] = words[0].lstrip("-@:+!")  # systemd's prefixes
    argv: list[str] = []
    for word in words:
        if whole := re.fullmatch(r"\$([A-Za-z_]\w*)", word):
            argv += lookup(whole[1]).split()  # zero or more words
            continue
        expanded = re.sub(r"\$\{([A-Za-z_]\w*)\}", lambda m: lookup(m[1]), word)
        assert "$" not in expanded, f"{unit.path.name}: {word!r} is not expanded by systemd"
        assert expanded, f"{unit.path.name}: {word!r} expands to an empty argument"
        argv.append(expanded)
    return argv


def lepton_args(argv: list[str]) -> list[str]:
    """The arguments of ``lepton`` that the command line amounts to."""
    exe = PurePosixPath(argv[0])
    assert exe.is_absolute(), f"ExecStart must name an absolute path, got {argv[0]}"
    if exe.name == "lepton":
        return argv[1:]
    if re.fullmatch(r"python3?[0-9.]*", exe.name) and argv[1:2] == ["-m"]:
        assert argv[2] in MODULES, f"python -m {argv[2]}: not a lepton_ai program"
        return [MODULES[argv[2]], *argv[3:]]
    pytest.fail(f"ExecStart runs neither lepton nor python -m lepton_ai...: {argv}")


def parse(args: list[str]) -> argparse.Namespace:
    """Parse as ``lepton`` does, and again without abbreviations: argparse would take
    ``--replace-after-s`` for a renamed ``--replace-after-seconds``."""
    try:
        ns = build_parser().parse_args(args)
    except SystemExit as exc:
        pytest.fail(f"`lepton {shlex.join(args)}` refused by the lepton parser (exit {exc.code})")
    strict = argparse.ArgumentParser(prog=f"lepton {args[0]}", allow_abbrev=False)
    ADD_ARGS[args[0]](strict)
    try:
        exact = strict.parse_args(args[1:])
    except SystemExit as exc:
        pytest.fail(f"`lepton {shlex.join(args)}`: a flag is not exact (exit {exc.code})")
    for key, value in vars(exact).items():
        assert getattr(ns, key) == value, f"lepton {args[0]} and its argument function differ"
    return ns


def writable_roots(unit: Unit, instance: str) -> list[PurePosixPath]:
    roots = [PurePosixPath(STATE_ROOT, d) for d in unit.value("Service", "StateDirectory").split()]
    for value in unit.values("Service", "ReadWritePaths"):
        roots += [PurePosixPath(specifiers(p, instance).lstrip("-")) for p in value.split()]
    return roots


def assert_writable(unit: Unit, instance: str, data_dir: str) -> None:
    """ProtectSystem=strict makes everything else read-only."""
    path = PurePosixPath(data_dir)
    roots = writable_roots(unit, instance)
    assert any(path.is_relative_to(r) for r in roots), f"{data_dir} not under {roots}"


# ---------------------------------------------------------------- the tests


def test_restart_policy() -> None:
    replace_after_s = argparse.ArgumentParser()
    add_coordinator_args(replace_after_s)
    for path in (COORDINATOR, WORKER):
        unit = parse_unit(path)
        svc = "Service"
        assert unit.value(svc, "Restart") == "always", path.name
        assert seconds(unit.value(svc, "RestartSec")) <= 1.0, path.name
        # The back-off (systemd >= 254; older ones ignore it and keep RestartSec).
        assert int(unit.value(svc, "RestartSteps")) >= 1, path.name
        assert seconds(unit.value(svc, "RestartMaxDelaySec")) > seconds(
            unit.value(svc, "RestartSec")
        )
        # A crash loop ends in a failed unit, as the built-in supervisor reports one.
        assert seconds(unit.value("Unit", "StartLimitIntervalSec")) > 0, path.name
        assert int(unit.value("Unit", "StartLimitBurst")) >= 3, path.name
        assert unit.value(svc, "User") == "lepton", path.name
        assert unit.value(svc, "StateDirectory") == "lepton", path.name
        assert unit.value(svc, "NoNewPrivileges") == "yes", path.name
        assert unit.value(svc, "ProtectSystem") == "strict", path.name
        assert unit.value(svc, "PrivateTmp") == "yes", path.name

    coordinator = parse_unit(COORDINATOR)
    # A coordinator removed from the group exits EXIT_REMOVED: it must stay down.
    prevent = coordinator.value("Service", "RestartPreventExitStatus").split()
    assert str(EXIT_REMOVED) in prevent
    # A restart slower than the leader's default --replace-after-s would cost the
    # coordinator its seat, for a mere crash.
    cap = seconds(coordinator.value("Service", "RestartMaxDelaySec"))
    assert cap < replace_after_s.get_default("replace_after_s")

    worker = parse_unit(WORKER)
    # The agent's executors die with it, and are not left behind by a restart; "mixed":
    # SIGTERM to the agent alone (it stops its executors itself), SIGKILL to what is left.
    assert worker.value("Service", "KillMode") == "mixed"
    assert str(EXIT_REMOVED) not in worker.values("Service", "RestartPreventExitStatus")


@pytest.mark.parametrize("instance, optional", [("0", False), ("100", True)])
def test_coordinator_exec_start(
    instance: str, optional: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    unit = parse_unit(COORDINATOR)
    env = environment(unit, instance, optional=optional)
    argv = exec_argv(unit, instance, env)
    args = lepton_args(argv)
    ns = parse(args)
    assert ns.command == "coordinator"
    assert "--token" not in args, "the token goes in the environment, not in ps"
    assert "--no-fsync" not in args and "--listen-fd" not in args and "--paxos-fd" not in args
    monkeypatch.setenv("LEPTON_TOKEN", env["LEPTON_TOKEN"])
    assert resolve_token(ns.token) == env["LEPTON_TOKEN"]
    # The checks run_coordinator makes before it binds anything.
    assert ns.id == int(instance)
    peers = parse_peers(ns.peers)
    assert ns.id in peers
    voters = parse_peers(env["LEPTON_COORDINATOR_PEERS"])
    assert ns.host and ns.host != "0.0.0.0", "the bound address is the leader's address"
    assert ns.port > 0, "workers need a fixed port to --join"
    if optional:  # the example's standby: the voters and itself, --standby
        assert ns.standby
        assert {k: v for k, v in peers.items() if k != ns.id} == voters
    else:  # a voter: the Paxos listener binds its own --peers entry, on this host
        assert not ns.standby
        assert peers == voters
        assert parse_address(peers[ns.id])[0] == ns.host
        assert f"{ns.host}:{ns.port}" in env["LEPTON_JOIN"].split(",")
    assert_writable(unit, instance, ns.data_dir)
    assert ns.data_dir.endswith(f"coordinator-{instance}"), "one directory per coordinator"


@pytest.mark.parametrize("optional", [False, True])
def test_worker_exec_start(optional: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    unit = parse_unit(WORKER)
    env = environment(unit, "h1", optional=optional)
    argv = exec_argv(unit, "h1", env)
    args = lepton_args(argv)
    ns = parse(args)
    assert ns.command == "worker"
    assert "--token" not in args, "the token goes in the environment, not in ps"
    assert "--no-fsync" not in args
    monkeypatch.setenv("LEPTON_TOKEN", env["LEPTON_TOKEN"])
    assert resolve_token(ns.token) == env["LEPTON_TOKEN"]
    assert ns.name == "h1", "the instance names the worker (and its objects' directory)"
    # The checks the worker program (node.programs) makes before it starts.
    assert ns.slots >= 1 and ns.spares >= 0 and ns.storage_bytes_max >= 0
    joins = [parse_address(a) for a in ns.join.split(",")]
    if not optional:  # this host's coordinator is one of those the agent follows
        assert (env["LEPTON_HOST"], int(env["LEPTON_COORDINATOR_PORT"])) in joins
    assert_writable(unit, "h1", ns.data_dir)


def _systemd_version(tool: str) -> int:
    out = subprocess.run([tool, "--version"], capture_output=True, text=True, check=True)
    m = re.match(r"systemd (\d+)", out.stdout)
    assert m, out.stdout
    return int(m[1])


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    version = _systemd_version(tool)
    # verify checks that ExecStart's program exists: point it at this venv's (or at
    # least at an executable: verify does not run it).
    lepton = Path(sys.executable).with_name("lepton")
    if not lepton.exists():
        lepton = Path(sys.executable)
    units = []
    for path, instance in ((COORDINATOR, "0"), (WORKER, "h1")):
        unit = parse_unit(path)
        (line,) = unit.values("Service", "ExecStart")
        installed = shlex.split(line)[0]
        copy = tmp_path / path.name
        copy.write_text(path.read_text().replace(installed, str(lepton)))
        instance_path = tmp_path / path.name.replace("@.", f"@{instance}.")
        instance_path.symlink_to(copy.name)
        units.append(str(instance_path))
    # (Not --recursive-errors=no: systemd 252 then fails on the implicit, absent
    # var-lib-lepton.mount and the like, and says nothing.)
    proc = subprocess.run(
        [tool, "verify", "--man=no", *units],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    ours = [
        line
        for line in (proc.stdout + proc.stderr).splitlines()
        if str(tmp_path) in line or "lepton-" in line
    ]
    unexpected = []
    for line in ours:
        unknown = re.search(r"Unknown (?:key|key name|lvalue) '(\w+)'", line)
        if unknown and KEY_SINCE.get(unknown[1], 0) > version:
            continue  # documented in the units: this systemd is too old for the key
        if version < 240 and "Failed to parse service type, ignoring: exec" in line:
            continue
        unexpected.append(line)
    assert proc.returncode == 0 and not unexpected, (
        f"systemd-analyze verify (systemd {version}), exit {proc.returncode}:\n"
        + "\n".join(unexpected or ours)
    )
