"""`python -m bench SUBCOMMAND [--quick]`: each prints a table and writes JSON to bench/results/."""

from __future__ import annotations

import argparse
import logging


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    runtime = sub.add_parser("runtime", help="runtime factory p99; engine load vs compile per strategy")
    runtime.add_argument("--quick", action="store_true", help="small model, fewer repeats (CI smoke)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.command == "runtime":
        from . import runtime as bench_runtime

        print(f"results: {bench_runtime.run(args.quick)}")


if __name__ == "__main__":
    main()
