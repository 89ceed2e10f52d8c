"""The ``stagecomp`` command line: ``demo``, ``compress`` and ``report``.

Every failure a user can cause (a typo in a model or layer name, a rank that
does not fit, a damaged save) is printed as one line, ``stagecomp: error: ...``,
with a non-zero exit code; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from stagecomp.errors import StagecompError
from stagecomp.methods import methods_for_kind
from stagecomp.report import format_count as _human
from stagecomp.report import format_ratio as _ratio

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


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise CLIError(f"--threads {threads} is not allowed; expected an integer >= 1")
        import torch

        torch.set_num_threads(threads)


# ---------------------------------------------------------------------- demo
def _demo(args: argparse.Namespace) -> int:
    from stagecomp.demo import format_header, format_row, run_demo, write_outputs

    if args.threads is not None and args.threads < 1:
        raise CLIError(f"--threads {args.threads} is not allowed; expected an integer >= 1")
    print(
        f"Training a CNN on scikit-learn's digits, then compressing it {args.rate:g}x "
        f"in {args.stages} stage(s), {args.layers_per_step} layer(s) per step, "
        f"fine-tuning {args.finetune_epochs} epoch(s) after each step (seed {args.seed})...",
        flush=True,
    )
    rows: list[Any] = []

    def show(row: Any) -> None:
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
def _classification_models() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def build_torchvision_model(name: str, num_classes: int | None = None) -> Any:
    """A torchvision classifier with random weights, or a one-line error with close names."""
    import torchvision

    names = _classification_models()
    if name not in names:
        every = set(torchvision.models.list_models())
        if name in every:
            raise CLIError(
                f"{name!r} is not an image classification model; stagecomp compress "
                "builds torchvision classifiers (e.g. resnet18, resnet50, vgg16, mobilenet_v2)"
            )
        close = difflib.get_close_matches(name.lower(), names, n=4, cutoff=0.5)
        hint = f"; closest names: {', '.join(close)}" if close else ""
        raise CLIError(
            f"unknown torchvision model {name!r}{hint} "
            "(all names: python -c 'import torchvision; print(torchvision.models.list_models())')"
        )
    kwargs: dict[str, Any] = {}
    if num_classes is not None:
        if num_classes < 1:
            raise CLIError(f"--num-classes {num_classes} is not allowed; expected >= 1")
        kwargs["num_classes"] = num_classes
    if name in ("googlenet", "inception_v3"):
        kwargs["init_weights"] = True  # silences torchvision's warning about the default
    return torchvision.models.get_model(name, weights=None, **kwargs)


def load_weights_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A state dict from a safetensors file or a ``torch.save`` file, never running pickled code.

    Checkpoints that wrap the state dict (``{"state_dict": ...}`` or ``{"model": ...}``)
    are unwrapped, and a ``module.`` prefix left by DataParallel/DDP is removed.
    """
    import torch

    file = Path(path)
    if not file.is_file():
        raise CLIError(f"weights file {file} does not exist")
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state: Any = load_file(str(file), device="cpu")
        except (SafetensorError, OSError, ValueError) as error:
            raise CLIError(f"cannot read {file} as safetensors: {_one_line(error)}") from None
    else:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as error:  # any unpickling failure is the file's fault
            raise CLIError(
                f"cannot read {file} as a weights-only torch.save file: {_one_line(error)} "
                "(stagecomp never unpickles arbitrary objects; save model.state_dict() "
                "or use safetensors)"
            ) from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CLIError(f"{file} does not hold a state dict (a mapping of names to tensors)")
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return dict(state)


def _last_weight(state: dict[str, Any]) -> str:
    """The classifier's weight: the last weight of the state dict."""
    weights = [k for k in state if k.endswith(".weight")]
    return weights[-1] if weights else ""


def _load_into(model: Any, state: dict[str, Any], file: str, name: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s) such as {missing[0]!r}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) such as {unexpected[0]!r}")
    if wrong:
        key = wrong[0]
        hint = (
            " (try --num-classes)" if key.endswith(".weight") and key == _last_weight(own) else ""
        )
        problems.append(
            f"{key!r} has shape {tuple(state[key].shape)} but {name} has "
            f"{tuple(own[key].shape)}{hint}"
        )
    if problems:
        raise CLIError(f"weights file {file} does not fit {name}: {'; '.join(problems)}")
    model.load_state_dict(state)


def _parse_rank(text: str) -> int | tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a rank; expected an integer (a cap on every rank, e.g. 64) "
            "or integers separated by commas (exact ranks, e.g. 64,32)"
        ) from None
    return values[0] if len(values) == 1 else values


def _strategy(args: argparse.Namespace) -> Any:
    from stagecomp.strategies.manual import Manual
    from stagecomp.strategies.reduction import Reduction
    from stagecomp.strategies.vbmf import VBMF

    owner = {"rate": "reduction", "weakening": "vbmf", "rank": "manual"}
    for option, strategy in owner.items():
        if getattr(args, option) is not None and args.strategy != strategy:
            raise CLIError(
                f"--{option} applies to --strategy {strategy}, not --strategy {args.strategy}"
            )
    if args.strategy == "reduction":
        return Reduction(2.0 if args.rate is None else args.rate)
    if args.strategy == "vbmf":
        return VBMF(weakening=1.0 if args.weakening is None else args.weakening)
    if args.rank is None:
        raise CLIError("--strategy manual needs --rank N (or N,M,... for exact ranks)")
    return Manual(rank=args.rank)


def compressor_summary(compressor: Any) -> dict[str, Any]:
    """Whole-model and per-layer totals of a Compressor's run, JSON-ready.

    ``stagecomp report`` shows them when a save carries them in ``extra["summary"]``.
    """
    history = compressor.history
    original = compressor.original_stats
    layer_macs: dict[str, list[int | None]] = {}
    layer_params: dict[str, list[int]] = {}
    for result in history:
        for change in result.changes:
            if change.name not in layer_macs:
                layer_macs[change.name] = [change.macs_before, change.macs_before]
                layer_params[change.name] = [change.params_before, change.params_before]
            if change.skipped is None:
                layer_macs[change.name][1] = change.macs_after
                layer_params[change.name][1] = change.params_after
    first_params = history[0].params_before if history else None
    return {
        "params_before": original.params if original else first_params,
        "params_after": history[-1].params_after if history else None,
        "macs_before": original.macs if original else None,
        "macs_after": history[-1].macs_after if history else None,
        "layer_macs": layer_macs,
        "layer_params": layer_params,
        "layer_order": list(layer_macs),  # JSON objects are saved with sorted keys
        "steps": len(history),
    }


def _compress(args: argparse.Namespace) -> int:
    import torch

    from stagecomp.compressor import Compressor
    from stagecomp.options import DecomposeOptions
    from stagecomp.serialization import save

    _set_threads(args.threads)
    strategy = _strategy(args)
    if args.input_size < 8:
        raise CLIError(f"--input-size {args.input_size} is too small; expected >= 8 pixels")
    for label, value in (("--stages", args.stages), ("--layers-per-step", args.layers_per_step)):
        if value is not None and value < 1:
            raise CLIError(f"{label} {value} is not allowed; expected an integer >= 1")
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        raise CLIError(f"--device {args.device!r}: {_one_line(error)}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda was asked for, but torch sees no CUDA device here")
    torch.manual_seed(args.seed)
    model = build_torchvision_model(args.model, args.num_classes)
    if args.weights is not None:
        _load_into(model, load_weights_file(args.weights), args.weights, args.model)
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
        "conv_method": args.conv_method,
        "linear_method": args.linear_method,
        "stages": args.stages,
        "order": args.order,
        "options": DecomposeOptions(seed=args.seed),
    }
    layers_per_step = args.layers_per_step
    if layers_per_step is None:  # one step per stage: count the targets cheaply first
        layers_per_step = len(Compressor(model, strategy, progress=False, **common).targets)
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
    print(report)
    print(f"compression took {seconds:.1f} s (no fine-tuning)")
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
    folder = save(model, args.out, extra=extra)
    (folder / "report.txt").write_text(report + "\n")
    classes = "" if args.num_classes is None else f", num_classes={args.num_classes}"
    print(f"saved to {folder}/ (stagecomp.json, model.safetensors, report.txt)")
    print(
        "load it with: stagecomp.load(torchvision.models.get_model("
        f"{args.model!r}, weights=None{classes}), {str(folder)!r})"
    )
    return 0


# ---------------------------------------------------------------------- report
def _describe_shape(shape: Any) -> str:
    if shape.kind == "linear":
        return f"Linear {shape.in_channels}->{shape.out_channels}"
    kh, kw = shape.kernel_size
    text = f"Conv2d {shape.in_channels}->{shape.out_channels} {kh}x{kw}"
    if shape.stride != (1, 1):
        text += (
            f" s{shape.stride[0]}" if shape.stride[0] == shape.stride[1] else f" s{shape.stride}"
        )
    if shape.groups > 1:
        text += f" g{shape.groups}"
    return text


def _natural_key(name: str) -> list[tuple[int, int | str]]:
    return [(0, int(part)) if part.isdigit() else (1, part) for part in name.split(".")]


def _model_order(names: list[str], recorded: Any) -> list[str]:
    """Recorded model order when the save has it, else a natural sort (layer2 < layer10)."""
    order = [n for n in recorded if n in names] if isinstance(recorded, list) else []
    rest = sorted((n for n in names if n not in order), key=_natural_key)
    return order + rest


def format_saved_report(path: str | os.PathLike[str]) -> str:
    """The table of a folder written by ``stagecomp.save``, from its recipe alone.

    Parameter counts come from the layer classes' ``param_count``, so no model is
    built. Whole-model totals and MACs appear when the save records them
    (``stagecomp compress`` and ``stagecomp demo --out`` do).
    """
    from stagecomp.layer_shape import LayerShape
    from stagecomp.options import DecomposeOptions
    from stagecomp.registry import layer_class
    from stagecomp.serialization import read_recipe

    recipe = read_recipe(path)
    layers: dict[str, Any] = recipe["layers"]
    extra = recipe.get("extra") or {}
    summary = extra.get("summary") if isinstance(extra, dict) else None
    summary = summary if isinstance(summary, dict) else {}
    layer_macs = summary.get("layer_macs") or {}
    lines = [
        f"{path}: {len(layers)} decomposed layer(s); format {recipe['format_version']}, "
        f"written by stagecomp {recipe.get('stagecomp_version', '?')} with torch "
        f"{recipe.get('torch_version', '?')}"
    ]
    if isinstance(extra, dict) and extra.get("model"):
        strategy = extra.get("strategy") or {}
        described = ", ".join(f"{k} {v}" for k, v in strategy.items() if k != "strategy")
        lines.append(
            f"model {extra['model']} at {extra.get('input_size', '?')} px, strategy "
            f"{strategy.get('strategy', '?')}{f' ({described})' if described else ''}, "
            f"{extra.get('stages', '?')} stage(s)"
        )
    if not layers:
        lines.append("no layer is decomposed in this save")
        return "\n".join(lines)
    width = max(28, *(len(name) for name in layers))
    show_macs = bool(layer_macs)
    header = (
        f"{'layer':<{width}} {'method':<8} {'ranks':<14} {'original':<26} {'params':>19} {'x':>6}"
    )
    if show_macs:
        header += f" {'MACs':>19} {'x':>6}"
    lines += ["", header]
    total_before = total_after = 0
    macs_before = macs_after = 0
    for name in _model_order(list(layers), summary.get("layer_order")):
        entry = layers[name]
        try:
            shape = LayerShape.from_dict(entry["original"])
            structure = {
                k: tuple(v) if isinstance(v, list) else v
                for k, v in dict(entry.get("structure", {})).items()
            }
            options = DecomposeOptions().updated(structure)
            cls = layer_class(str(entry["method"]), shape, name)
            ranks = tuple(int(r) for r in entry["ranks"])
            after = cls.param_count(shape, ranks, options)
        except StagecompError:
            raise
        except (KeyError, TypeError, ValueError) as error:
            raise CLIError(
                f"recipe entry for layer {name!r} is invalid: {_one_line(error)}"
            ) from None
        before = shape.dense_params
        total_before += before
        total_after += after
        row = (
            f"{name:<{width}} {cls.method:<8} {','.join(map(str, ranks)):<14} "
            f"{_describe_shape(shape):<26} {_human(before) + ' -> ' + _human(after):>19} "
            f"{_ratio(before, after):>6}"
        )
        if show_macs:
            pair = layer_macs.get(name) or [None, None]
            macs_before += pair[0] or 0
            macs_after += pair[1] or 0
            row += (
                f" {_human(pair[0]) + ' -> ' + _human(pair[1]):>19} {_ratio(pair[0], pair[1]):>6}"
            )
        lines.append(row)
    lines.append("")
    totals = (
        f"decomposed layers: params {_human(total_before)} -> {_human(total_after)} "
        f"({_ratio(total_before, total_after)} fewer)"
    )
    if show_macs:
        totals += f", MACs {_human(macs_before)} -> {_human(macs_after)} "
        totals += f"({_ratio(macs_before, macs_after)} fewer)"
    lines.append(totals)
    if summary.get("params_before") and summary.get("params_after"):
        model_line = (
            f"whole model: params {_human(summary['params_before'])} -> "
            f"{_human(summary['params_after'])} "
            f"({_ratio(summary['params_before'], summary['params_after'])} fewer)"
        )
        if summary.get("macs_before") and summary.get("macs_after"):
            model_line += (
                f", MACs {_human(summary['macs_before'])} -> {_human(summary['macs_after'])} "
                f"({_ratio(summary['macs_before'], summary['macs_after'])} fewer)"
            )
        lines.append(model_line)
    return "\n".join(lines)


def _report(args: argparse.Namespace) -> int:
    print(format_saved_report(args.path))
    return 0


# ---------------------------------------------------------------------- parser
_EPILOG = """\
examples:
  stagecomp demo --out demo_out
  stagecomp compress resnet18 --strategy vbmf --out resnet18_vbmf
  stagecomp compress resnet50 --strategy reduction --rate 3 --stages 2 --exclude fc --out r50
  stagecomp compress vgg16 --strategy manual --rank 64 --conv-method cp3 --out vgg16_cp3
  stagecomp report resnet18_vbmf

Python: import stagecomp; help(stagecomp.Compressor)"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``stagecomp`` command."""
    from stagecomp import __version__

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

    demo = commands.add_parser(
        "demo",
        help="train a small CNN on real digits and compress it in stages (no download)",
        description=(
            "Train a CNN on scikit-learn's 1797 real 8x8 digits, compress it in stages with "
            "short fine-tuning after every step, and print test accuracy, parameters, MACs "
            "and measured CPU latency against the original. Deterministic for a seed and a "
            "thread count; about 20 s on 2 cores."
        ),
        formatter_class=_HelpFormatter,
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
    demo.set_defaults(handler=_demo)

    compress = commands.add_parser(
        "compress",
        help="compress a torchvision model and save it",
        description=(
            "Compress a torchvision classifier (random weights, or yours with --weights) in "
            "one or more stages, print the per-step report and save the result with "
            "stagecomp.save. No fine-tuning happens here: for that, use the Python API "
            "(stagecomp.Compressor) and your own training loop between steps."
        ),
        formatter_class=_HelpFormatter,
    )
    compress.add_argument("model", metavar="MODEL", help="torchvision model name, e.g. resnet18")
    compress.add_argument(
        "--strategy",
        choices=("vbmf", "reduction", "manual"),
        required=True,
        help=(
            "how ranks are chosen: VBMF's noise floor (meant for trained weights: random "
            "ones have none), a parameter-reduction rate, or ranks you give"
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
        nargs="+",
        metavar="NAME",
        help="layer names or patterns to leave alone ('fc', 'layer4.*', 're:...')",
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
    compress.set_defaults(handler=_compress)

    report = commands.add_parser(
        "report",
        help="show the layers, ranks and parameter counts of a saved compressed model",
        description=(
            "Print the table of a folder written by stagecomp.save (or stagecomp compress): "
            "per decomposed layer its method, ranks, original shape and parameters before and "
            "after, with totals. Read from the recipe; no model is built."
        ),
    )
    report.add_argument("path", metavar="DIR", help="folder holding stagecomp.json")
    report.set_defaults(handler=_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; errors are one line and a non-zero exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        print("stagecomp: interrupted", file=sys.stderr)
        return 130
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
