"""``python -m loadtest cluster``: the multi-node harness (loadtest.cluster) as a command.

    python -m loadtest cluster up      # 3 nodes behind HAProxy, in the background
    python -m loadtest cluster status  # nodes, their readiness, HAProxy's view of them
    python -m loadtest cluster kill node2 | drain node2 | start node2
    python -m loadtest cluster down

``up`` starts a supervisor process (``up --foreground`` is that process: Ctrl-C stops
it) that owns the cluster, writes ``state.json`` in the run folder
(``<tmp>/dropserver-cluster/<name>``, beside the logs and the HAProxy configuration) and
answers the other commands on a Unix socket there (``control.sock``, one JSON line each
way). It stops by itself after ``--lifetime`` seconds; whatever way it ends, the
namespaces, the bridge and every process go with it. ``kill`` and ``drain`` print the
moment of the fault as ``monotonic=<seconds>`` (``CLOCK_MONOTONIC``, shared by every
process of the machine): ``rehearse --fault`` times the viewers' recovery from there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from loadtest._netreaper import alive as _alive

__all__ = ["add_arguments", "main"]

DEFAULT_LIFETIME_S = 4 * 3600


def _run_dir(args: argparse.Namespace) -> Path:
    if getattr(args, "run_dir", ""):
        return Path(args.run_dir)
    return Path(tempfile.gettempdir()) / "dropserver-cluster" / args.name


def _read_state(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / "state.json").read_text())
    except (OSError, ValueError):
        return None


def _write_state(run_dir: Path, state: dict[str, Any]) -> None:
    tmp = run_dir / "state.json.tmp"
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(run_dir / "state.json")


def _ask(run_dir: Path, request: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
    """One request to the supervisor over its control socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(run_dir / "control.sock"))
        s.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data or b'{"ok": false, "error": "no answer"}')


# -- the supervisor (up --foreground) ------------------------------------------------------

async def _supervise(cluster: Any, run_dir: Path, lifetime_s: float,
                     state: dict[str, Any]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = json.loads(await reader.readline() or b"{}")
            answer = await _command(cluster, request, stop)
        except Exception as exc:  # an answer, never a dead supervisor
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        writer.write(json.dumps(answer).encode() + b"\n")
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    sock_path = run_dir / "control.sock"
    with contextlib.suppress(FileNotFoundError):
        sock_path.unlink()
    server = await asyncio.start_unix_server(handle, path=str(sock_path))
    state.update(status="up")
    _write_state(run_dir, state)
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(lifetime_s):
                await stop.wait()
    finally:
        server.close()
        with contextlib.suppress(FileNotFoundError):
            sock_path.unlink()


async def _command(cluster: Any, request: dict[str, Any], stop: asyncio.Event) -> dict:
    cmd = request.get("cmd")
    if cmd == "status":
        return {"ok": True, "status": await asyncio.to_thread(cluster.status)}
    if cmd == "stop":
        stop.set()
        return {"ok": True}
    if cmd in ("kill", "drain", "start"):
        node = cluster.node(request.get("node", ""))
        if cmd == "kill":
            at = await asyncio.to_thread(cluster.kill_node, node.index)
            return {"ok": True, "node": node.name, "monotonic": at}
        if cmd == "drain":
            # Answered once the node has exited: drained, every viewer told and closed.
            at = await asyncio.to_thread(cluster.drain_node, node.index, True)
            return {"ok": True, "node": node.name, "monotonic": at}
        await asyncio.to_thread(cluster.start_node, node.index)
        return {"ok": True, "node": node.name}
    return {"ok": False, "error": f"unknown command {cmd!r}"}


def _foreground(args: argparse.Namespace) -> int:
    from loadtest.cluster import Cluster, ClusterConfig

    run_dir = _run_dir(args)
    run_dir.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = {"name": args.name, "pid": os.getpid(), "status": "starting",
                             "run_dir": str(run_dir)}
    _write_state(run_dir, state)
    cluster = Cluster(ClusterConfig(
        name=args.name, nodes=args.nodes, workers=args.workers,
        balancer_processes=args.balancer_processes, port=args.port,
        redis_url=args.redis_url, redis_cluster=args.redis_cluster,
        database_url=args.database_url,
        node_env=_env_pairs(args.node_env), run_dir=str(run_dir)))
    started = time.monotonic()
    try:
        cluster.start()
    except Exception as exc:
        state.update(status="failed", error=f"{type(exc).__name__}: {exc}"[:4000])
        _write_state(run_dir, state)
        print(f"cluster {args.name}: {state['error']}", file=sys.stderr)
        return 1
    try:
        status = cluster.status()
        state.update(status, pid=os.getpid(), resources=cluster.resources(),
                     started_s=round(time.monotonic() - started, 1),
                     stops_at=time.time() + args.lifetime)
        asyncio.run(_supervise(cluster, run_dir, args.lifetime, state))
    finally:
        cluster.stop()
        state.update(status="stopped")
        _write_state(run_dir, state)
    return 0


def _env_pairs(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"--node-env wants NAME=VALUE, got {item!r}")
        env[name] = value
    return env


# -- the commands --------------------------------------------------------------------------

def cmd_up(args: argparse.Namespace) -> int:
    run_dir = _run_dir(args)
    state = _read_state(run_dir)
    if state and state.get("status") in ("starting", "up") and _alive(state.get("pid")):
        print(f"cluster {args.name} is already up (pid {state['pid']}): "
              f"python -m loadtest cluster down --name {args.name}", file=sys.stderr)
        return 1
    if args.foreground:
        return _foreground(args)
    run_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        (run_dir / "state.json").unlink()
    argv = _argv_of(args)
    log = open(run_dir / "cluster.log", "ab")
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "loadtest", *argv, "--foreground"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True)
    finally:
        log.close()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        state = _read_state(run_dir)
        if state and state.get("status") == "up":
            print(_describe(state))
            return 0
        if state and state.get("status") == "failed":
            print(f"cluster {args.name} did not start: {state.get('error')}", file=sys.stderr)
            return 1
        if proc.poll() is not None:
            tail = (run_dir / "cluster.log").read_text(errors="replace")[-2000:]
            print(f"cluster {args.name} exited with {proc.returncode}:\n{tail}",
                  file=sys.stderr)
            return 1
        time.sleep(0.2)
    proc.terminate()
    print(f"cluster {args.name} did not come up in 300 s (log: {run_dir}/cluster.log)",
          file=sys.stderr)
    return 1


def _argv_of(args: argparse.Namespace) -> list[str]:
    argv = ["cluster", "up", "--name", args.name, "--nodes", str(args.nodes),
            "--workers", str(args.workers), "--balancer-processes",
            str(args.balancer_processes), "--port", str(args.port),
            "--lifetime", str(args.lifetime)]
    for flag, value in (("--redis-url", args.redis_url), ("--database-url",
                        args.database_url), ("--run-dir", args.run_dir)):
        if value:
            argv += [flag, value]
    if args.redis_cluster:
        argv.append("--redis-cluster")
    for item in args.node_env or []:
        argv += ["--node-env", item]
    return argv


def _describe(state: dict[str, Any]) -> str:
    stops = time.strftime("%H:%M:%S", time.localtime(state.get("stops_at", 0)))
    lines = [f"cluster {state['name']} up in {state.get('started_s')} s: "
             f"{len(state['nodes'])} nodes behind HAProxy "
             f"({state.get('balancer_processes')} processes)",
             f"  balancer    {state['balancer']}  ({state['ws']})"]
    for node in state["nodes"]:
        lines.append(f"  {node['name']:<10}  {node['address']}  (namespace {node['netns']})")
    lines += [f"  Redis       {state['redis_url']}",
              f"  PostgreSQL  {state['database_url']}",
              f"  logs        {state['run_dir']}",
              f"  stops by itself at {stops}, or: python -m loadtest cluster down "
              f"--name {state['name']}",
              "",
              "rehearse a drop through it:",
              f"  python -m loadtest rehearse --target {state['balancer']} "
              f"--database-url {state['database_url']} --viewers 2000 --stock 100"]
    return "\n".join(lines)


def _supervisor(args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    run_dir = _run_dir(args)
    state = _read_state(run_dir)
    if not state:
        raise SystemExit(f"cluster {args.name}: not found ({run_dir}/state.json)")
    if state.get("status") != "up":
        raise SystemExit(f"cluster {args.name} is not up (status {state.get('status')})")
    if not _alive(state.get("pid")):
        raise SystemExit(f"cluster {args.name}: its supervisor (pid {state.get('pid')}) is "
                         f"gone; `python -m loadtest cluster down --name {args.name}` cleans "
                         "up what is left")
    return run_dir, state


def cmd_status(args: argparse.Namespace) -> int:
    run_dir, _ = _supervisor(args)
    answer = _ask(run_dir, {"cmd": "status"})
    status = answer["status"]
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(f"cluster {status['name']}: balancer {status['balancer']}")
    print(f"  {'node':<8} {'address':<20} {'readyz':<12} {'HAProxy':<12} "
          f"{'conns':>6}  pids")
    for n in status["nodes"]:
        print(f"  {n['name']:<8} {n['address']:<20} {str(n['readyz'])[:12]:<12} "
              f"{'/'.join(n['balancer']):<12} {n['connections']:>6}  "
              f"{' '.join(map(str, n['pids'])) or '-'}")
    return 0


def cmd_node(args: argparse.Namespace) -> int:
    run_dir, _ = _supervisor(args)
    answer = _ask(run_dir, {"cmd": args.command, "node": args.node})
    if not answer.get("ok"):
        print(f"cluster {args.command} {args.node}: {answer.get('error')}", file=sys.stderr)
        return 1
    verb = {"kill": "killed (SIGKILL)", "drain": "drained (SIGTERM) and stopped",
            "start": "started"}[args.command]
    at = f" monotonic={answer['monotonic']:.6f}" if "monotonic" in answer else ""
    print(f"{answer['node']} {verb}{at}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from loadtest._netreaper import remove

    run_dir = _run_dir(args)
    state = _read_state(run_dir)
    if not state:
        print(f"cluster {args.name}: nothing to stop ({run_dir}/state.json)")
        return 0
    pid = state.get("pid")
    if pid and _alive(pid):
        try:
            _ask(run_dir, {"cmd": "stop"}, timeout=10)
        except (OSError, ValueError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)  # the reapers clean up after it
    # Whatever a killed supervisor left behind (its reaper removes it too).
    remove([tuple(r) for r in state.get("resources", [])])
    print(f"cluster {args.name} down")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)

    def named(q: argparse.ArgumentParser) -> argparse.ArgumentParser:
        q.add_argument("--name", default="default", help="which cluster (default: default)")
        q.add_argument("--run-dir", default="", help="its folder (default: "
                       "<tmp>/dropserver-cluster/<name>)")
        return q

    up = named(sub.add_parser("up", help="start nodes, HAProxy, Redis and PostgreSQL"))
    up.add_argument("--nodes", type=int, default=3)
    up.add_argument("--workers", type=int, default=1, help="worker processes per node")
    up.add_argument("--balancer-processes", type=int, default=2,
                    help="HAProxy processes sharing the port (each holds at most half the "
                    "open-files limit in viewers)")
    up.add_argument("--port", type=int, default=0, help="the balancer's port on "
                    "127.0.0.1 (default: a free one)")
    up.add_argument("--redis-url", default="", help="a Redis the nodes' namespaces reach "
                    "(default: start one on the harness's bridge)")
    up.add_argument("--redis-cluster", action="store_true", help="start a Redis Cluster "
                    "(3 primaries, 3 replicas) on the bridge instead of one Redis")
    up.add_argument("--database-url", default="", help="likewise PostgreSQL")
    up.add_argument("--node-env", action="append", default=[], metavar="NAME=VALUE",
                    help="environment of every node (repeat), e.g. DROPSERVER_HOLD_TTL=60")
    up.add_argument("--lifetime", type=float, default=DEFAULT_LIFETIME_S,
                    help="seconds after which it stops by itself (default: 4 h)")
    up.add_argument("--foreground", action="store_true",
                    help="stay in this terminal (Ctrl-C stops it)")
    status = named(sub.add_parser("status", help="nodes and HAProxy's view of them"))
    status.add_argument("--json", action="store_true")
    named(sub.add_parser("down", help="stop everything and clean up"))
    for action, text in (("kill", "SIGKILL every process of a node (a crash)"),
                         ("drain", "SIGTERM a node's serve (viewers get going_away); returns "
                          "once it stopped"),
                         ("start", "start a stopped node again")):
        q = named(sub.add_parser(action, help=text))
        q.add_argument("node", help="node1, node2, ... (or 1, 2, ...)")


def main(args: argparse.Namespace) -> int:
    if args.action == "up":
        return cmd_up(args)
    if args.action == "status":
        return cmd_status(args)
    if args.action == "down":
        return cmd_down(args)
    args.command = args.action
    return cmd_node(args)
