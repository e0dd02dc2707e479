"""The tests' own row helpers: a native crash is retried once and reported; nothing else is."""

from __future__ import annotations

import pytest

from _rows import run_once_more_after_a_native_crash
from shardimpl.launch import RankResult

CRASH = RankResult(0, "error", None, "rank 0 died with exit code -6 before reporting (killed by a signal or os._exit)")
OK = RankResult(0, "ok", 1, None)
PYTHON_ERROR = RankResult(0, "error", None, "Traceback ...\nValueError: bad")


def _scripted(*results):
    calls = []

    def run(*args, **kwargs):
        calls.append(args)
        return [results[len(calls) - 1]]
    return run, calls


def test_a_native_crash_runs_the_world_once_more_with_a_warning():
    run, calls = _scripted(CRASH, OK)
    with pytest.warns(RuntimeWarning, match="killed by a signal"):
        rows = run_once_more_after_a_native_crash(run, "fn", 2)
    assert rows == [OK] and len(calls) == 2


def test_a_crash_that_comes_back_is_returned_as_is():
    run, calls = _scripted(CRASH, CRASH)
    with pytest.warns(RuntimeWarning):
        assert run_once_more_after_a_native_crash(run) == [CRASH]
    assert len(calls) == 2


def test_python_errors_are_never_retried():
    run, calls = _scripted(PYTHON_ERROR, OK)
    assert run_once_more_after_a_native_crash(run) == [PYTHON_ERROR] and len(calls) == 1
