"""Benchmark: how long `dropserver dev` takes from launch to /readyz == 200.

    python -m benchmarks.startup --runs 5

Each run starts a fresh `dropserver dev --port 0` (its own Redis and PostgreSQL,
initdb included; :func:`benchmarks._support.start_dev`), reads its banner, polls
/readyz every 10 ms until it answers 200, then stops it with SIGINT. Prints one JSON
line with every run and the median/max.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import urllib.request

from benchmarks._support import start_dev


def one_run() -> float:
    started = time.monotonic()
    server = start_dev()
    try:
        # The banner is printed once /readyz answered; poll anyway to time it exactly.
        while True:
            try:
                with urllib.request.urlopen(server.base_url + "/readyz", timeout=1) as resp:
                    if resp.status == 200:
                        return time.monotonic() - started
            except OSError:
                time.sleep(0.01)
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    runs = [round(one_run(), 3) for _ in range(args.runs)]
    print(json.dumps({"runs_s": runs, "median_s": statistics.median(runs),
                      "max_s": max(runs)}))


if __name__ == "__main__":
    main()
