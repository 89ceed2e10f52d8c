"""The ``stagecomp`` command line: ``demo``, ``compress`` and ``report``.

Argument parsing, calls into the library and printing only: the tables come from
:mod:`stagecomp.report`, the models from :mod:`stagecomp.zoo`. Every failure a user can
cause (a typo in a model or layer name, a rank that does not fit, a damaged save) is
printed as one line, ``stagecomp: error: ...``, with a non-zero exit code; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn

from stagecomp import __version__
from stagecomp.compressor import Compressor
from stagecomp.demo import DemoRow, format_header, format_row, run_demo, write_outputs
from stagecomp.errors import StagecompError
from stagecomp.legacy import kind_methods
from stagecomp.methods import methods_for_kind
from stagecomp.options import DecomposeOptions
from stagecomp.plan import build_plan
from stagecomp.report import compressor_summary
from stagecomp.report import format_count as _human
from stagecomp.saved_report import format_saved_report
from stagecomp.serialization import RECIPE_FILE, WEIGHTS_FILE, save
from stagecomp.strategies.base import RankStrategy
from stagecomp.strategies.manual import Manual
from stagecomp.strategies.reduction import Reduction
from stagecomp.strategies.speedup import Speedup
from stagecomp.strategies.vbmf import VBMF
from stagecomp.zoo import build_torchvision_model, load_into, load_weights_file

EXIT_ERROR = 1
EXIT_USAGE = 2
_MAX_MESSAGE = 600


class CLIError(StagecompError, ValueError):
    """A problem with what was asked on the command line (shown without a traceback)."""


class _HelpFormatter(argparse.HelpFormatter):
    """Wrapped descriptions (multi-line text such as examples kept as written); an
    option's default shown only when it has one."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        shown = default is not None and default is not False and default != argparse.SUPPRESS
        if action.option_strings and shown:
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line that points at ``--help``."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"stagecomp: error: {message} (see '{self.prog} --help')\n")


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


def _at_least_one(label: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise CLIError(f"{label} {value} is not allowed; expected an integer >= 1")


# ---------------------------------------------------------------------- demo
def _demo(args: argparse.Namespace) -> int:
    _at_least_one("--threads", args.threads)
    if args.out is not None and Path(args.out).exists() and not Path(args.out).is_dir():
        raise CLIError(f"--out {args.out!r} is an existing file; expected a folder")
    print(
        f"Training a CNN on scikit-learn's digits, then compressing it {args.rate:g}x "
        f"in {args.stages} stage(s), {args.layers_per_step} layer(s) per step, "
        f"fine-tuning {args.finetune_epochs} epoch(s) after each step (seed {args.seed})...",
        flush=True,
    )
    rows: list[DemoRow] = []

    def show(row: DemoRow) -> None:
        if not rows:
            print(format_header())
        rows.append(row)
        print(format_row(row, rows[0]), flush=True)

    result = run_demo(
        seed=args.seed,
        rate=args.rate,
        stages=args.stages,
        layers_per_step=args.layers_per_step,
        epochs=args.epochs,
        finetune_epochs=args.finetune_epochs,
        threads=args.threads,
        on_row=show,
    )
    print(
        "speed x: measured CPU latency of the original / this model "
        f"(batch of 256, {args.threads} thread(s)); total {result.seconds:.1f} s"
    )
    if args.out is not None:
        written = write_outputs(result, args.out)
        print(f"wrote {written['table']}, {written['csv']} and the plot {written['plot']}")
        print(
            f"saved the compressed model in {written['model']} "
            f"(see: stagecomp report {written['model']})"
        )
    return 0


# ---------------------------------------------------------------------- compress
def _parse_rank(text: str) -> int | tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a rank; expected an integer (a cap on every rank, e.g. 64) "
            "or integers separated by commas (exact ranks, e.g. 64,32)"
        ) from None
    return values[0] if len(values) == 1 else values


def _strategy(args: argparse.Namespace) -> RankStrategy:
    owner = {
        "rate": "reduction",
        "weakening": "vbmf",
        "rank": "manual",
        "speedup": "speedup",
        "macs": "speedup",
        "batch_size": "speedup",
    }
    for option, strategy in owner.items():
        if getattr(args, option) is not None and args.strategy != strategy:
            flag = option.replace("_", "-")
            raise CLIError(
                f"--{flag} applies to --strategy {strategy}, not --strategy {args.strategy}"
            )
    if args.strategy == "speedup":
        try:
            return Speedup(
                2.0 if args.speedup is None else args.speedup,
                macs=args.macs,
                batch_size=args.batch_size,
            )
        except StagecompError as error:
            raise CLIError(_one_line(error)) from None
    if args.strategy == "reduction":
        return Reduction(2.0 if args.rate is None else args.rate)
    if args.strategy == "vbmf":
        return VBMF(weakening=1.0 if args.weakening is None else args.weakening)
    if args.rank is None:
        raise CLIError("--strategy manual needs --rank N (or N,M,... for exact ranks)")
    return Manual(rank=args.rank)


def _count_targets(model: nn.Module, strategy: RankStrategy, common: dict[str, Any]) -> int:
    """How many layers the run will decompose: its plan, computed without counting MACs."""
    plan = build_plan(
        model,
        strategy=strategy,
        ranks={},
        exclude=common["exclude"],
        methods=common["methods"],
        factors=None,
        options=common["options"],
        stages=1,
        layers_per_step=1,
        order="model",
        layer_macs=None,
        calibrated=False,
    )
    return len(plan.targets)


def _names_list(text: str) -> list[str]:
    """``"conv1,fc"`` -> ``["conv1", "fc"]``: one flag may name several layers."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r} names no layer")
    return names


def _check_out(out: str, force: bool) -> None:
    """Refuse an --out that cannot take the result before any work is done."""
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise CLIError(f"--out {out!r} is an existing file; expected a folder")
    saved = [name for name in (RECIPE_FILE, WEIGHTS_FILE) if (folder / name).exists()]
    if saved and not force:
        raise CLIError(
            f"--out {out!r} already holds a saved model ({', '.join(saved)}); choose another "
            "folder or pass --force to overwrite it"
        )
    parent = folder.resolve().parent
    if not folder.exists() and not os.access(_existing_ancestor(parent), os.W_OK):
        raise CLIError(f"--out {out!r}: cannot create a folder there (no write permission)")


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _compress(args: argparse.Namespace) -> int:
    _check_out(args.out, args.force)
    _at_least_one("--threads", args.threads)
    strategy = _strategy(args)
    if args.input_size < 8:
        raise CLIError(f"--input-size {args.input_size} is too small; expected >= 8 pixels")
    _at_least_one("--stages", args.stages)
    _at_least_one("--layers-per-step", args.layers_per_step)
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        raise CLIError(f"--device {args.device!r}: {_one_line(error)}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda was asked for, but torch sees no CUDA device here")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = build_torchvision_model(args.model, args.num_classes)
    if args.weights is not None:
        load_into(model, load_weights_file(args.weights), args.weights, args.model)
    model = model.to(device).eval()
    example = torch.randn(1, 3, args.input_size, args.input_size, device=device)
    try:
        with torch.no_grad():
            model(example)
    except (RuntimeError, ValueError, AssertionError) as error:
        raise CLIError(
            f"{args.model} does not run on a 1x3x{args.input_size}x{args.input_size} input "
            f"({_one_line(error)}); try another --input-size"
        ) from None

    common: dict[str, Any] = {
        "exclude": args.exclude or [],
        "methods": kind_methods(model, args.conv_method, args.linear_method),
        "stages": args.stages,
        "order": args.order,
        "options": DecomposeOptions(seed=args.seed),
    }
    layers_per_step = args.layers_per_step
    if layers_per_step is None:  # one step per stage: count the targets cheaply first
        layers_per_step = _count_targets(model, strategy, common)
    started = time.perf_counter()
    compressor = Compressor(
        model,
        strategy,
        example,
        layers_per_step=layers_per_step,
        progress=not args.quiet,
        **common,
    )
    while not compressor.done:
        step_start = time.perf_counter()
        result = compressor.compression_step()
        if not args.quiet:
            print(
                f"step {result.step}/{compressor.total_steps}: {len(result.replaced)} layer(s) "
                f"replaced, params {_human(result.params_before)} -> "
                f"{_human(result.params_after)} ({time.perf_counter() - step_start:.1f} s)",
                file=sys.stderr,
                flush=True,
            )
    seconds = time.perf_counter() - started
    report = compressor.report()
    summary = compressor_summary(compressor)
    extra = {
        "command": "stagecomp compress",
        "model": args.model,
        "num_classes": args.num_classes,
        "weights": str(args.weights) if args.weights else None,
        "input_size": args.input_size,
        "strategy": strategy.to_dict(),
        "conv_method": args.conv_method,
        "linear_method": args.linear_method,
        "stages": args.stages,
        "layers_per_step": layers_per_step,
        "exclude": list(args.exclude or []),
        "seed": args.seed,
        "seconds": round(seconds, 3),
        "summary": summary,
    }
    if isinstance(strategy, Speedup):
        measured = [f"Speedup {outcome}" for outcome in strategy.outcomes]
        extra["speedup"] = measured
        report = "\n".join([report, *measured])
    folder = save(model, args.out, extra=extra)
    (folder / "report.txt").write_text(report + "\n")
    print(report)
    print(f"compression took {seconds:.1f} s (no fine-tuning)")
    classes = "" if args.num_classes is None else f", num_classes={args.num_classes}"
    print(f"saved to {folder}/ (stagecomp.json, stagecomp.safetensors, report.txt)")
    print(
        "load it with: stagecomp.load(torchvision.models.get_model("
        f"{args.model!r}, weights=None{classes}), {str(folder)!r})"
    )
    return 0


# ---------------------------------------------------------------------- report
def _report(args: argparse.Namespace) -> int:
    print(format_saved_report(args.path))
    return 0


# ---------------------------------------------------------------------- parser
_EPILOG = """\
examples:
  stagecomp demo --out demo_out
  stagecomp compress resnet18 --strategy reduction --rate 2 --out resnet18_r2
  stagecomp compress resnet50 --strategy reduction --rate 3 --stages 2 --exclude fc --out r50
  stagecomp compress resnet18 --weights my_resnet18.pt --strategy vbmf --out resnet18_vbmf
  stagecomp compress vgg16 --strategy manual --rank 64 --conv-method cp3 --out vgg16_cp3
  stagecomp compress resnet50 --strategy speedup --speedup 1.7 --macs 2 --out r50_fast
  stagecomp report resnet18_r2

VBMF finds structure in trained weights only: without --weights it replaces nothing.

Python: import stagecomp; help(stagecomp.Compressor)"""


def _command(
    commands: Any,
    name: str,
    handler: Callable[[argparse.Namespace], int],
    help: str,
    description: str,
) -> argparse.ArgumentParser:
    """A subcommand whose parsed arguments are handled by ``handler(args)``."""
    command: argparse.ArgumentParser = commands.add_parser(
        name, help=help, description=description, formatter_class=_HelpFormatter
    )
    command.set_defaults(handler=handler)
    return command


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``stagecomp`` command."""
    parser = _Parser(
        prog="stagecomp",
        description=(
            "Multi-stage low-rank compression of PyTorch models: Linear and Conv2d layers are "
            "replaced by SVD, Tucker2, CP or tensor-train factorisations, a few at a time."
        ),
        epilog=_EPILOG,
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"stagecomp {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = _command(
        commands,
        "demo",
        _demo,
        help="train a small CNN on real digits and compress it in stages (no download)",
        description=(
            "Train a CNN on scikit-learn's 1797 real 8x8 digits, compress it in stages with "
            "short fine-tuning after every step, and print test accuracy, parameters, MACs "
            "and measured CPU latency against the original. Deterministic for a seed and a "
            "thread count; about 20 s on 2 cores."
        ),
    )
    demo.add_argument("--seed", type=int, default=0, help="seed of data split, model and training")
    demo.add_argument("--rate", type=float, default=3.0, help="parameter reduction per layer")
    demo.add_argument("--stages", type=int, default=2, help="global compression passes")
    demo.add_argument("--layers-per-step", type=int, default=2, help="layers per step")
    demo.add_argument("--epochs", type=int, default=15, help="training epochs of the original")
    demo.add_argument(
        "--finetune-epochs", type=int, default=3, help="fine-tuning epochs after each step"
    )
    demo.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (results depend on it)"
    )
    demo.add_argument(
        "--out",
        metavar="DIR",
        help="also write demo.txt, demo.csv, a demo.png plot and the compressed model here",
    )

    compress = _command(
        commands,
        "compress",
        _compress,
        help="compress a torchvision model and save it",
        description=(
            "Compress a torchvision classifier (random weights, or yours with --weights) in "
            "one or more stages, print the per-step report and save the result with "
            "stagecomp.save. No fine-tuning happens here: for that, use the Python API "
            "(stagecomp.Compressor) and your own training loop between steps."
        ),
    )
    compress.add_argument("model", metavar="MODEL", help="torchvision model name, e.g. resnet18")
    compress.add_argument(
        "--strategy",
        choices=("vbmf", "reduction", "manual", "speedup"),
        required=True,
        help=(
            "how ranks are chosen: VBMF's noise floor (meant for trained weights: random "
            "ones have none), a parameter-reduction rate, ranks you give, or a whole-model "
            "speed-up measured on this machine"
        ),
    )
    compress.add_argument(
        "--rate",
        type=float,
        default=None,
        metavar="R",
        help="reduction: R times fewer parameters per layer (default: 2)",
    )
    compress.add_argument(
        "--weakening",
        type=float,
        default=None,
        metavar="W",
        help="vbmf: 1 keeps the VBMF rank, 0 the full rank (default: 1)",
    )
    compress.add_argument(
        "--rank",
        type=_parse_rank,
        default=None,
        metavar="N[,M...]",
        help="manual: one int caps every rank; N,M,... gives exact ranks",
    )
    compress.add_argument(
        "--speedup",
        type=float,
        default=None,
        metavar="S",
        help="speedup: the whole model S times faster, timed here (default: 2)",
    )
    compress.add_argument(
        "--macs",
        type=float,
        default=None,
        metavar="M",
        help="speedup: also M times fewer MACs; S is then the least speed-up",
    )
    compress.add_argument(
        "--batch-size",
        type=int,
        default=None,
        metavar="N",
        help="speedup: time at batch N (default: 1)",
    )
    compress.add_argument(
        "--conv-method",
        choices=methods_for_kind("conv2d"),
        default="tucker2",
        help="method for kxk convolutions (1x1 convolutions use svd)",
    )
    compress.add_argument(
        "--linear-method",
        choices=methods_for_kind("linear"),
        default="svd",
        help="method for Linear layers",
    )
    compress.add_argument(
        "--stages", type=int, default=1, metavar="N", help="global compression passes"
    )
    compress.add_argument(
        "--layers-per-step",
        type=int,
        default=None,
        metavar="K",
        help="layers per step (default: all target layers, one step per stage)",
    )
    compress.add_argument(
        "--order", choices=("model", "macs"), default="model", help="layer order within a stage"
    )
    compress.add_argument(
        "--exclude",
        action="extend",
        type=_names_list,
        metavar="NAME[,NAME...]",
        help=(
            "layer names or patterns to leave alone ('fc', 'layer4.*', 're:...'); repeat the "
            "flag or separate names by commas: --exclude conv1 --exclude fc, --exclude conv1,fc"
        ),
    )
    compress.add_argument(
        "--input-size",
        type=int,
        default=224,
        metavar="PX",
        help="side of the example image used to count MACs",
    )
    compress.add_argument(
        "--weights",
        metavar="FILE",
        help="state dict to load first (.safetensors, or torch.save loaded with weights_only)",
    )
    compress.add_argument(
        "--num-classes", type=int, default=None, metavar="N", help="classifier outputs, if not 1000"
    )
    compress.add_argument("--seed", type=int, default=0, help="seed of random weights and input")
    compress.add_argument("--device", default="cpu", help="where to compress (cpu, cuda)")
    compress.add_argument(
        "--threads",
        type=int,
        default=1,
        metavar="N",
        help=(
            "torch CPU threads; 1 is fastest for the small SVDs of most layers and does not "
            "stall when other processes use the cores"
        ),
    )
    compress.add_argument("--quiet", action="store_true", help="no progress on stderr")
    compress.add_argument(
        "--out", required=True, metavar="DIR", help="folder to save the compressed model in"
    )
    compress.add_argument(
        "--force", action="store_true", help="overwrite a compressed model already saved in --out"
    )

    report = _command(
        commands,
        "report",
        _report,
        help="show the layers, ranks and parameter counts of a saved compressed model",
        description=(
            "Print the table of a folder written by stagecomp.save (or stagecomp compress): "
            "per decomposed layer its method, ranks, original shape and parameters before and "
            "after, with totals. Read from the recipe; no model is built."
        ),
    )
    report.add_argument("path", metavar="DIR", help="folder holding stagecomp.json")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; errors are one line and a non-zero exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        print("stagecomp: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of our output went away (``| head``): what was to be saved is saved.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except Exception as error:
        if args.debug:
            raise
        if isinstance(error, (StagecompError, ImportError, OSError)):
            message = _one_line(error)
        else:  # a bug or an unforeseen case: still one line, with the way to see more
            message = (
                f"unexpected {type(error).__name__}: {_one_line(error)} "
                "(run with --debug for the traceback)"
            )
        print(f"stagecomp: error: {message}", file=sys.stderr)
        return EXIT_ERROR


# Kept importable from here for older code: they now live in the library modules.
__all__ = [
    "CLIError",
    "build_parser",
    "build_torchvision_model",
    "compressor_summary",
    "format_saved_report",
    "load_weights_file",
    "main",
]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
