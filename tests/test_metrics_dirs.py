"""A supervisor's temp folder (the workers' metrics files and fan-out board): it
removes its own when it stops, and a supervisor starting sweeps those whose owner
is gone (killed with SIGKILL, so its own cleanup never ran)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from dropserver.serve import METRICS_PREFIX, OWNER_FILE, _process_mark, sweep_metrics_dirs
from dropserver.services import stop_process
from dropserver.settings import unsafe_rig_env


def folder(base, name: str, owner: str | None) -> str:
    path = base / f"{METRICS_PREFIX}{name}"
    path.mkdir()
    (path / "counter_1.db").write_bytes(b"x")
    if owner is not None:
        (path / OWNER_FILE).write_text(owner + "\n")
    return str(path)


def test_only_folders_whose_owner_is_gone_are_swept(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    gone_mark = _process_mark(gone.pid)
    gone.kill()
    gone.wait()
    me = _process_mark(os.getpid())
    assert gone_mark and me
    dead = folder(tmp_path, "dead", gone_mark)
    live = folder(tmp_path, "live", me)
    # Our pid, another start time: the pid was reused, the owner is gone.
    reused = folder(tmp_path, "reused", f"{os.getpid()} 1")
    unmarked = folder(tmp_path, "unmarked", None)  # being created, or an older version
    other = tmp_path / "something-else"
    other.mkdir()
    (other / OWNER_FILE).write_text(gone_mark + "\n")

    assert sorted(sweep_metrics_dirs(str(tmp_path))) == sorted([dead, reused])
    assert not os.path.exists(dead) and not os.path.exists(reused)
    assert os.path.exists(live) and os.path.exists(unmarked) and other.exists()


def marked_folders(base) -> dict[str, str]:
    out = {}
    for entry in os.scandir(base):
        mark = os.path.join(entry.path, OWNER_FILE)
        if entry.name.startswith(METRICS_PREFIX) and os.path.exists(mark):
            with open(mark) as f:
                out[entry.path] = f.read().strip()
    return out


def wait_for_folder(base, pid: int) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for path, owner in marked_folders(base).items():
            if owner.split()[0] == str(pid):
                return path
        time.sleep(0.2)
    raise AssertionError(f"no metrics folder for supervisor {pid}")


@pytest.mark.timeout(120)
def test_a_supervisor_sweeps_the_folder_of_one_killed_before_it(clean_backends, tmp_path):
    from tests.conftest import free_port

    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env.update({"REDIS_URL": clean_backends.redis_url,
                "DATABASE_URL": clean_backends.database_url, **unsafe_rig_env(),
                "DROPSERVER_LOG_FORMAT": "text", "DROPSERVER_SHUTDOWN_GRACE": "1",
                "TMPDIR": str(tmp_path)})

    def start() -> subprocess.Popen:
        argv = [sys.executable, "-m", "dropserver.cli", "serve", "--workers", "2",
                "--port", str(free_port())]
        return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)

    first = start()
    try:
        killed = wait_for_folder(tmp_path, first.pid)
        assert os.path.exists(os.path.join(killed, "fanout-board"))
    finally:
        first.kill()  # no cleanup of its own
        first.wait()
    assert os.path.exists(killed)

    second = start()
    try:
        own = wait_for_folder(tmp_path, second.pid)
        assert not os.path.exists(killed)
        assert os.path.exists(own)
    finally:
        stop_process(second, signal.SIGTERM, 30)
    assert not os.path.exists(own)  # removed its own on the way out
