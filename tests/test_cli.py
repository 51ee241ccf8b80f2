"""`dropserver dev` and `dropserver serve` as real processes."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from dropserver.settings import unsafe_rig_env


def _get(url: str, timeout: float = 2.0):
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.status, json.loads(resp.read())


def _tree(pid: int) -> dict[int, psutil.Process]:
    """The launcher's processes now: its children and theirs, by pid. Each
    ``psutil.Process`` remembers its start time, so a pid used again by another
    process later is not taken for it (``is_running``). Only this tree is looked at,
    not every process on the machine: in a parallel test run another test's processes
    can carry the same port or directory in their command lines."""
    return {p.pid: p for p in psutil.Process(pid).children(recursive=True)}


def _cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return ""


def _in_tree(tree: dict[int, psutil.Process], text: str) -> list[psutil.Process]:
    """The processes of ``tree`` whose command line holds ``text``."""
    return [p for p in tree.values() if text in _cmdline(p)]


def _still_running(tree: dict[int, psutil.Process]) -> list[str]:
    left = []
    for proc in tree.values():
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{proc.pid} {_cmdline(proc)[:100]}")
        except psutil.NoSuchProcess:
            pass
    return left


def _assert_gone(tree: dict[int, psutil.Process], root: Path) -> None:
    """Within 10 s: every process of the launcher's ``tree`` has exited and its
    directory ``root`` is deleted."""
    deadline = time.monotonic() + 10
    while (_still_running(tree) or root.exists()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _still_running(tree) == [], "left running"
    assert not root.exists(), f"{root} was left behind"


def _wait_line(proc: subprocess.Popen, pattern: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        if re.search(pattern, line):
            return line
    raise AssertionError(f"{pattern!r} not seen; output:\n{''.join(seen)}")


def _dev_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env["DROPSERVER_LOG_FORMAT"] = "text"
    return env


def test_dev_kill_9_leaves_nothing_behind():
    proc = subprocess.Popen(
        [sys.executable, "-m", "dropserver.cli", "dev", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=_dev_env(),
    )
    try:
        line = _wait_line(proc, r"HTTP\s+http://", 30)
        base = line.split()[-1]
        status, body = _get(base + "/readyz")
        assert status == 200 and body["status"] == "ready"
        rline = _wait_line(proc, r"Redis\s+redis://", 5)
        redis_port = rline.rsplit(":", 1)[1].split("/")[0]
        pg = _wait_line(proc, r"PostgreSQL\s+postgresql://", 5)
        pg_port = pg.rsplit(":", 1)[1].split("/")[0]
        tree = _tree(proc.pid)
        servers = _in_tree(tree, f"-p {pg_port}")
        assert servers, f"the PostgreSQL child was not found: {_still_running(tree)}"
        cmd = servers[0].cmdline()
        datadir = Path(cmd[cmd.index("-D") + 1])
        root = datadir.parents[1]
        assert root.name.startswith("dropserver-") and root.exists()
        # Valkey rewrites its title to "valkey-server HOST:PORT".
        assert _in_tree(tree, f"127.0.0.1:{redis_port}"), "the Redis child was not found"
        assert _in_tree(tree, "dropserver._reaper"), "the reaper was not found"
        tree.update(_tree(proc.pid))  # and anything started since
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    _assert_gone(tree, root)


def _both_workers_answer(port: int) -> None:
    nodes = set()
    deadline = time.monotonic() + 40
    while len(nodes) < 2 and time.monotonic() < deadline:
        try:
            # A new connection each time: SO_REUSEPORT spreads them over workers.
            nodes.add(_get(f"http://127.0.0.1:{port}/healthz", 1)[1]["node"])
        except OSError:
            time.sleep(0.1)
    assert len(nodes) == 2, f"saw workers {nodes}"


@pytest.mark.timeout(90)
def test_serve_runs_workers_on_one_port_and_drains(backends):
    env = _dev_env()
    env.update({"REDIS_URL": backends.redis_url, "DATABASE_URL": backends.database_url,
                "DROPSERVER_SHUTDOWN_GRACE": "3", **unsafe_rig_env()})
    from tests.conftest import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dropserver.cli", "serve", "--workers", "2",
         "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )
    try:
        _both_workers_answer(port)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.timeout(90)
def test_ctrl_c_in_a_terminal_stops_every_worker_through_its_app_shutdown(backends):
    """A terminal's Ctrl-C sends SIGINT to the whole foreground process group: the
    supervisor and each worker at once, and the supervisor then forwards SIGTERM to
    each worker. A worker took those two signals for "stop now, again": it skipped
    its app's shutdown (journals, presence, order workers) and logged a traceback."""
    env = _dev_env()
    env.update({"REDIS_URL": backends.redis_url, "DATABASE_URL": backends.database_url,
                "DROPSERVER_SHUTDOWN_GRACE": "3", "DROPSERVER_LOG_FORMAT": "json",
                **unsafe_rig_env()})
    from tests.conftest import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dropserver.cli", "serve", "--workers", "2",
         "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
        start_new_session=True,  # its own process group, as a shell gives a job
    )
    try:
        _both_workers_answer(port)
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    errors = [r["msg"][:200] for r in records if r.get("level") in ("error", "critical")]
    assert not errors
    done = [r for r in records if r.get("msg") == "Application shutdown complete."]
    assert len(done) == 2, [r.get("msg") for r in records][-20:]


def test_workers_import_the_supervisors_code_not_the_working_directorys(tmp_path):
    # A supervisor started from one checkout's directory with another on PYTHONPATH
    # (`python -P`, as an A/B benchmark serves the code before a change) had workers
    # importing the working directory's checkout: `python -c` puts it first.
    import dropserver
    from dropserver.serve import worker_command

    shadow = tmp_path / "dropserver"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise SystemExit('the working directory won')\n")
    out = subprocess.run(
        worker_command("import dropserver; print(dropserver.__file__)"), cwd=tmp_path,
        capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == dropserver.__file__


def test_token_command_issues_a_verifiable_token():
    out = subprocess.run(
        [sys.executable, "-m", "dropserver.cli", "token", "--sub", "carol",
         "--role", "creator"], capture_output=True, text=True, check=True, env=_dev_env(),
    ).stdout.strip()
    import jwt

    from dropserver.settings import DEV_JWT_SECRET

    claims = jwt.decode(out, DEV_JWT_SECRET, algorithms=["HS256"], audience="dropserver")
    assert claims["sub"] == "carol" and claims["role"] == "creator"


def test_invalid_setting_stops_startup_naming_the_variable():
    env = _dev_env()
    env["DROPSERVER_PORT"] = "not-a-port"
    out = subprocess.run([sys.executable, "-m", "dropserver.cli", "dev"],
                         capture_output=True, text=True, env=env, timeout=30)
    assert out.returncode == 2
    assert "DROPSERVER_PORT" in out.stderr


@pytest.mark.parametrize("name", ["asyncio", "uvloop"])
def test_workers_run_on_the_configured_event_loop(name: str) -> None:
    """uvicorn's default ("auto") takes uvloop whenever it is importable, and it is
    installed: the setting must reach uvicorn, or every worker runs on uvloop."""
    import asyncio

    import uvloop
    from starlette.applications import Starlette

    from dropserver.serve import uvicorn_config
    from dropserver.settings import load_settings

    config = uvicorn_config(Starlette(), load_settings({}, dev=True, event_loop=name))
    loop = config.get_loop_factory()()
    try:
        assert isinstance(loop, uvloop.Loop) == (name == "uvloop")
        assert isinstance(loop, asyncio.AbstractEventLoop)
    finally:
        loop.close()


def test_workers_collect_garbage_on_the_configured_thresholds() -> None:
    import gc

    from dropserver.serve import apply_gc_threshold
    from dropserver.settings import SettingsError, load_settings

    before = gc.get_threshold()
    try:
        gc.set_threshold(1, 2, 3)
        # Full collections 10x rarer than Python's, still often enough to give closed
        # sockets' memory back (benchmarks/churn.py).
        apply_gc_threshold(load_settings({}, dev=True))
        assert gc.get_threshold() == (700, 10, 100)
        apply_gc_threshold(load_settings({"DROPSERVER_GC_THRESHOLD": "100000,50,1000"},
                                         dev=True))
        assert gc.get_threshold() == (100_000, 50, 1000)
    finally:
        gc.set_threshold(*before)
    for bad in ("700,10", "0,10,10", "a,b,c"):
        with pytest.raises(SettingsError, match="DROPSERVER_GC_THRESHOLD"):
            load_settings({"DROPSERVER_GC_THRESHOLD": bad}, dev=True).validate()


def test_wait_port_returns_once_listening_and_fails_when_the_server_exits():
    import socket

    from dropserver.services import free_port, wait_port

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        wait_port(listener.getsockname()[1], deadline_s=5)  # returns
    dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    dead.wait()
    with pytest.raises(RuntimeError, match="exited with 3"):
        wait_port(free_port(), [dead], deadline_s=5)
    with pytest.raises(RuntimeError, match="nothing listens"):
        wait_port(free_port(), deadline_s=0.3)


@pytest.fixture(params=["plain", "reuseport"])
def busy_port(request):
    """A port some other program listens on: a plain socket, or one with SO_REUSEPORT
    (another dropserver's workers), which a SO_REUSEPORT bind would silently share."""
    import socket

    with socket.socket() as other:
        if request.param == "reuseport":
            other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        yield other.getsockname()[1]


@pytest.mark.parametrize("command", ["dev", "serve"])
def test_a_busy_port_is_named_with_how_to_pick_another(busy_port, backends, command):
    env = _dev_env()
    if command == "serve":
        env.update({"REDIS_URL": backends.redis_url, "DATABASE_URL": backends.database_url,
                    **unsafe_rig_env()})
    out = subprocess.run([sys.executable, "-m", "dropserver.cli", command, "--port",
                          str(busy_port)], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 1, out
    assert "Traceback" not in out.stderr, out.stderr
    assert f"port {busy_port}" in out.stderr and "already in use" in out.stderr
    assert "--port" in out.stderr and "DROPSERVER_PORT" in out.stderr


@pytest.mark.parametrize("argv, env, says", [
    (["migrate"], {"DATABASE_URL": "postgresql://u:secret@127.0.0.1:1/x"},
     "cannot reach PostgreSQL at 127.0.0.1:1"),
    (["dev", "--port", "0"], {"REDIS_URL": "redis://127.0.0.1:1/0"},
     "cannot reach Redis at 127.0.0.1:1"),
    (["serve", "--port", "0"], {"REDIS_URL": "redis://127.0.0.1:1/0",
                                "DATABASE_URL": "postgresql://127.0.0.1:1/x"},
     "cannot reach Redis at 127.0.0.1:1"),
    (["dev", "--host", "192.0.2.1", "--port", "0"], {}, "not an address of this machine"),
    (["services"], {"DROPSERVER_POSTGRES_BIN": "/nonexistent"},
     "cannot start the local Redis/PostgreSQL"),
])
def test_other_startup_errors_are_one_line_not_a_traceback(argv, env, says):
    full = {**_dev_env(), **env}
    if argv[0] == "serve":
        full.update(unsafe_rig_env())
    out = subprocess.run([sys.executable, "-m", "dropserver.cli", *argv], capture_output=True,
                         text=True, env=full, timeout=60)
    assert out.returncode == 1, out
    assert "Traceback" not in out.stderr, out.stderr
    assert says in out.stderr and "secret" not in out.stderr


def test_help_says_what_it_is_and_where_to_start() -> None:
    """``dropserver --help`` is a new user's first page: plain text (it printed the
    module docstring's ``double backticks``), what the program is, how to start."""
    from dropserver.cli import build_parser

    text = build_parser().format_help()
    assert "``" not in text
    assert "live-commerce" in text and "dropserver dev" in text
    assert "http://127.0.0.1:8000/" in text
