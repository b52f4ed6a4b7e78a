"""The `nested-reft` command line: one subcommand per stage, each a thin shell over library functions.

Every subcommand validates its inputs before any work starts and exits non-zero with a message that
names the bad field, file:line or value. Machine-readable output is printed with `--json`.
"""

import argparse
import json
import sys


class UsageError(Exception):
    """A bad input found before work started: printed as `error: ...`, exit code 2."""


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2))


# ---- bench ------------------------------------------------------------------------------------


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="rollout throughput: full vs nested models (measured vs ideal speedup)")
    p.set_defaults(func=_run_bench)


def _run_bench(args) -> int:
    raise UsageError("bench is not wired yet")


# ---- parser -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nested-reft",
        description="Reinforced fine-tuning with rollouts from layer-skipped nested models (Nested-ReFT).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_bench,):
        add(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
