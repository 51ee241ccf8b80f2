"""pyproject's pytest configuration: a test that leaves a coroutine never awaited
fails, wherever the coroutine is collected (at once, or in a later teardown), and
other unraisable exceptions stay warnings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

LEAKS = '''
import asyncio

import pytest

async def command():
    pass

KEPT = []

def test_dropped_at_once():
    command()

async def test_handed_to_a_task_cancelled_before_it_ran():
    made = command()

    async def wrapper():
        await made

    task = asyncio.ensure_future(wrapper())
    task.cancel()
    del made
    await asyncio.sleep(0)

@pytest.fixture(scope="module")
def kept():
    KEPT.append(command())
    yield
    KEPT.clear()  # collected in the module's teardown

def test_kept_by_a_module_fixture(kept):
    pass

class Finalizer:
    def __del__(self):
        raise ValueError("not a coroutine")

def test_another_unraisable_exception():
    Finalizer()

async def test_awaited():
    await command()
'''


def test_a_coroutine_never_awaited_fails_its_test(tmp_path: Path) -> None:
    (tmp_path / "test_leaks.py").write_text(LEAKS)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"),
         "--rootdir", str(tmp_path), "-p", "no:cacheprovider", "-p", "no:randomly",
         "-q", "-rfE", str(tmp_path / "test_leaks.py")],
        capture_output=True, text=True, timeout=60, cwd=tmp_path)
    out = run.stdout + run.stderr
    assert run.returncode == 1, out
    assert "FAILED test_leaks.py::test_dropped_at_once" in out, out
    assert "FAILED test_leaks.py::test_handed_to_a_task_cancelled_before_it_ran" in out, out
    # the fixture's coroutine is collected at the module's teardown, in the last test's
    assert "ERROR test_leaks.py::test_awaited" in out, out
    assert "2 failed, 3 passed, 1 warning, 1 error" in out, out
    assert "coroutine 'command' was never awaited" in out, out
    assert "ValueError: not a coroutine" in out, out  # reported, a warning only
