"""Benchmark: how long `dropserver dev` takes from launch to /readyz == 200.

    python -m benchmarks.startup --runs 5

Each run starts a fresh `dropserver dev --port 0` (its own Redis and PostgreSQL,
initdb included), polls /readyz every 10 ms, then stops it with SIGINT and checks
that its temp dir is gone. Prints one JSON line with every run and the median/max.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request


def one_run() -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env["DROPSERVER_LOG_LEVEL"] = "warning"
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "dropserver.cli", "dev", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=env)
    try:
        base = None
        while base is None:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError("dropserver dev exited early")
            if line.strip().startswith("HTTP"):
                base = line.split()[-1]
        # The banner is printed once /readyz answered; poll anyway to time it exactly.
        while True:
            try:
                with urllib.request.urlopen(base + "/readyz", timeout=1) as resp:
                    if resp.status == 200:
                        return time.monotonic() - started
            except OSError:
                time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    runs = [round(one_run(), 3) for _ in range(args.runs)]
    print(json.dumps({"runs_s": runs, "median_s": statistics.median(runs),
                      "max_s": max(runs)}))


if __name__ == "__main__":
    main()
