"""``python -m loadtest``: ``rehearse`` a whole drop, run the multi-node ``cluster``
harness, or run one ``swarm`` process."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    from loadtest import rehearse_cli

    r = sub.add_parser("rehearse", help="run one drop against N viewers and judge it")
    rehearse_cli.add_arguments(r)
    from loadtest import cluster_cli

    c = sub.add_parser("cluster", help="several nodes behind HAProxy on this machine "
                       "(up, status, kill, drain, start, down; root)")
    cluster_cli.add_arguments(c)
    sub.add_parser("swarm", help="one viewer swarm process (config as a JSON line on stdin; "
                   "started by `rehearse`)")
    args = parser.parse_args(argv)
    if args.command == "cluster":
        return cluster_cli.main(args)
    if args.command == "swarm":
        from loadtest.swarm import main as swarm_main

        return swarm_main()
    return rehearse_cli.main(args)


if __name__ == "__main__":
    sys.exit(main())
