"""Functions shipped by value keep their file name: a task's traceback points at the
user's file, not at ``<dynamic-code>`` (cloudpickle's default)."""

from __future__ import annotations

import pickle
import sys
import traceback

import cloudpickle

from lepton_ai.compute import pickling

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def parse(text: str) -> int:
    return int(text)


def test_a_by_value_function_keeps_its_file_and_line() -> None:
    shipped = pickle.loads(pickling.dumps(parse))
    assert shipped is not parse  # by value, as for a function of the user's __main__
    assert shipped("12") == 12
    try:
        shipped("twelve")
    except ValueError as exc:
        frames = traceback.extract_tb(exc.__traceback__)
    assert frames[-1].filename == __file__
    assert frames[-1].name == "parse"
    assert frames[-1].line == "return int(text)"
    # cloudpickle alone loses it: the reason for compute.pickling.
    plain = pickle.loads(cloudpickle.dumps(parse))
    assert plain.__code__.co_filename == "<dynamic-code>"


def test_nested_code_and_closures_survive() -> None:
    def outer(k: int) -> object:
        return lambda x: [y * k for y in x]

    shipped = pickle.loads(pickling.dumps(outer(3)))
    assert shipped([1, 2]) == [3, 6]
    assert shipped.__code__.co_filename == __file__
