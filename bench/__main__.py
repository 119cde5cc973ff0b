"""`python -m bench [--only NAME] [--quick]`: run the benchmarks one after another."""

from __future__ import annotations

import argparse
import importlib
import sys

from bench import BENCHMARKS


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench")
    p.add_argument("--only", choices=sorted(BENCHMARKS), action="append", help="run only this one")
    p.add_argument("--quick", action="store_true", help="small sizes, short runs (a smoke test)")
    args = p.parse_args(argv)
    status = 0
    for name in args.only or list(BENCHMARKS):
        print(f"== {name} ==", flush=True)
        module = importlib.import_module(BENCHMARKS[name])
        status |= module.main(["--quick"] if args.quick else [])
    return status


if __name__ == "__main__":
    sys.exit(main())
