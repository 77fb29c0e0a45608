"""`python -m bench SUBCOMMAND [--quick]`: each prints the machine, a table, and writes JSON to bench/results/.

`python -m bench all [--quick]` runs every subcommand in priority order (see bench/RESULTS.md)."""

from __future__ import annotations

import argparse
import importlib
import logging
import time

# subcommand -> (module, help); the order is the priority order and the order of `all`.
COMMANDS: dict[str, tuple[str, str]] = {
    "engine-hit": ("engine_hit", "200 MB engine: compile-or-reuse hit vs raw sha256 (p99, ratio)"),
    "verify": ("verify", "verify_cache of a >= 2 GB cache vs sha256sum and hashlib"),
    "coverage": ("coverage", "coverage walk over 1e6 tiles; tile enumeration 50x50 km at z17"),
    "index": ("index", "FAISS index build/recall/latency vs exact search and a plain IVF-Flat baseline"),
    "descriptors": ("descriptors", "describe_shard batching vs a bare ONNX Runtime loop"),
    "warm": ("provision", "warm re-provision vs sha256 of every cache file; fixed Prefect overhead"),
    "incremental": ("provision", "1 percent of tiles changed: re-provision as a fraction of a cold one"),
    "cold": ("provision", "cold provision vs the sum of its bare parts"),
    "runtime": ("runtime", "runtime factory p99; engine load vs compile per strategy"),
    "server": ("server", "CLI warm re-provision and first-output latency: ephemeral API vs navcache server"),
    "scale": ("scale", "1e4 (--full: 1e5) z17 tiles, EPSG:4326 imagery: cold/warm/1 percent, RSS; gdal2tiles"),
}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, text) in [*COMMANDS.items(), ("all", ("", "every subcommand above, in order"))]:
        command = sub.add_parser(name, help=text)
        command.add_argument("--quick", action="store_true", help="smaller inputs, fewer repeats (CI smoke)")
        if name == "scale":
            command.add_argument("--full", action="store_true", help="the full size: adds the 1e5-tile sortie")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    for name in COMMANDS if args.command == "all" else [args.command]:
        module = importlib.import_module(f"bench.{COMMANDS[name][0]}")
        started = time.perf_counter()
        runner = getattr(module, f"run_{name}", None) or module.run  # provision.py has one per subcommand
        path = runner(args.quick, full=True) if getattr(args, "full", False) else runner(args.quick)
        print(f"{name}: {time.perf_counter() - started:.1f} s, results: {path}\n")


if __name__ == "__main__":
    main()
