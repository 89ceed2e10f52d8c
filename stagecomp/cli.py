"""The ``stagecomp`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from stagecomp.errors import StagecompError


def _demo(args: argparse.Namespace) -> int:
    from stagecomp.demo import format_rows, run_demo

    print(
        f"Training a CNN on scikit-learn's digits, then compressing it {args.rate:g}x "
        f"in {args.stages} stages with fine-tuning between steps (seed {args.seed})...",
        flush=True,
    )
    rows = run_demo(seed=args.seed, rate=args.rate, stages=args.stages, threads=args.threads)
    print(format_rows(rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stagecomp",
        description="Multi-stage low-rank compression of PyTorch models.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo", help="train a small CNN on real digits and compress it in stages"
    )
    demo.add_argument("--seed", type=int, default=0, help="seed of data split, model and training")
    demo.add_argument("--rate", type=float, default=3.0, help="parameter reduction per layer")
    demo.add_argument("--stages", type=int, default=2, help="global compression passes")
    demo.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; errors are one line and a non-zero exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except (StagecompError, ImportError, OSError) as error:
        print(f"stagecomp: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
