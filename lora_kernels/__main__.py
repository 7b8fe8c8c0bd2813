"""`python -m lora_kernels` (also the `lora-kernels` command): what to run first on a new machine, and what
to paste into a bug report. A thin parser over library functions:

    python -m lora_kernels info        # versions (and whether they are in the supported range), CUDA, devices,
                                       # backends and why one is unavailable, the extension build, dispatch cache
    python -m lora_kernels selftest    # every backend vs. the float64 reference on this device; exit 1 on a FAIL
    python -m lora_kernels bench       # the quick benchmark (headline cases); --full for the whole grid; other
                                       # options go to `python -m lora_kernels.bench` (bench -- --help lists them)
    python -m lora_kernels tune        # fill the measured-dispatch cache ahead of time (lora_kernels/tune.py)
"""
from __future__ import annotations

import argparse
import json
import sys


def _info(args) -> int:
    from lora_kernels import diagnostics

    d = diagnostics.info(args.device)
    print(json.dumps(d, indent=1, default=str) if args.json else diagnostics.format_info(d))
    return 0


def _selftest(args) -> int:
    from lora_kernels import diagnostics

    backends = [b.strip() for b in args.backends.split(",")] if args.backends else None
    return diagnostics.run_selftest(args.device, backends, verbose=args.verbose)


def _bench(args) -> int:
    from lora_kernels.bench.__main__ import main

    rest = [a for a in args.rest if a != "--"]
    return main((["--quick"] if not args.full else []) + rest, prog="python -m lora_kernels bench")


def _tune(args) -> int:
    from lora_kernels import tune

    return tune.main(args)


def parser() -> argparse.ArgumentParser:
    from lora_kernels import tune

    p = argparse.ArgumentParser(prog="python -m lora_kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="{info,selftest,bench,tune}")
    s = sub.add_parser("info", help="environment, versions, backends, extension build, dispatch cache")
    s.add_argument("--device", default=None, help="whose backends to list (default: cuda when available, else cpu)")
    s.add_argument("--json", action="store_true", help="print the dict as JSON")
    s.set_defaults(func=_info)
    s = sub.add_parser("selftest", help="every backend against the float64 reference on this device")
    s.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    s.add_argument("--backends", default=None, help="comma list (default: every available backend)")
    s.add_argument("-v", "--verbose", action="store_true", help="print each check as it finishes")
    s.set_defaults(func=_selftest)
    s = sub.add_parser("bench", help="the quick benchmark (headline cases); other options go to the bench CLI",
                       description="Runs `python -m lora_kernels.bench --quick [ARGS]`: the same tables, JSON and "
                                   "PNG as `make bench`. `--full` drops --quick; `bench -- --help` lists ARGS.")
    s.add_argument("--full", action="store_true", help="the full grid instead of the headline cases")
    s.set_defaults(func=_bench, takes_rest=True)  # every other option goes to the bench CLI
    s = sub.add_parser("tune", help="measure the backends on this device and cache the fastest (measured dispatch)",
                       description=tune.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tune.add_arguments(s)
    s.set_defaults(func=_tune)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args, rest = p.parse_known_args(argv)
    if rest and not getattr(args, "takes_rest", False):
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    if args.command is None:
        p.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
