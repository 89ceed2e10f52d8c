"""Llama-like decoder LMs: held-out perplexity after compression, and calibration memory/time.

Two parts, each row in a fresh subprocess (its peak memory is its own: VmHWM from
``/proc/self/status``, reset once the model and batches are built, minus the RSS then):

``--part quality``: a small Llama-like model (``transformers.LlamaConfig`` /
``LlamaForCausalLM`` from config, random init, nothing downloaded), byte-level tokens,
trained here on the docstrings of the Python standard library (a fixed list of modules,
walked with ``inspect.getdoc``; about 0.75 MB of text on Python 3.12) with a fixed
held-out split (every 10th document). Training takes about 5 minutes on one thread; the
weights are cached under ``benchmarks/.cache/`` keyed by the settings and the text, so
reruns skip it. The default run (this part, training included) takes about 10 minutes on
one thread. Then the Linear layers of the decoder blocks (not the embedding or the LM
head) get 1.5x, 2x, 3x and 4x fewer parameters in total, by

- ``weight SVD``: one uniform reduction, factors from the weights alone;
- ``whiten``: the same uniform ranks, whitened SVD (SVD-LLM) from calibration data;
- ``gradient``: the same uniform ranks, also weighted on the output side by the moment
  of the logits' gradients;
- ``allocated``: ranks from ``sc.allocate_ranks(method="svd_id")`` and ``svd_id``
  layers with gradient factors.

The score is the held-out perplexity (per byte), with compression time and peak memory.

``--part memory``: a 97M-parameter Llama-like model (hidden 768, 12 blocks of 7 Linear
layers, MLP 2048, vocabulary 8000, untied head: 389 MB in float32) with *random*
weights: memory and time of calibration do not depend on the weights, only on the
shapes (the factors are meaningless). 84 block layers, 2x fewer parameters, calibration
on 8 batches of 2 x 128 random tokens; each case reports wall time and peak memory
above the loaded model, for the unbounded path (every statistic of every layer alive at
once) and the sequential one (``Calibration(blocks=...)``, ``allocate_ranks(blocks=...)``).
``--size 25m`` runs the same cases on a smaller model of the same family (hidden 384).
``benchmarks/profile_lm_phases.py`` splits one step of the block path into its phases.

Peak memory is resident memory (RSS, Linux only), not tracemalloc: torch's tensors are
allocated outside Python's allocator. The first line printed says the command, the date and
the load average (the machine may be shared: CPU seconds are steadier than wall seconds).

Run: ``python benchmarks/bench_lm.py [--part quality|memory|all] [--threads 1]
[--cases CASE ...] [--rates 1.5 2 ...]``
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / ".cache"

# ---------------------------------------------------------------------- memory part
BIG = {
    "vocab_size": 8000,
    "hidden_size": 768,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_key_value_heads": 12,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
    "use_cache": False,
}
SIZES = {  # --size: the 97M model, or smaller ones of the same shape family
    "97m": BIG,
    "25m": {**BIG, "hidden_size": 384, "intermediate_size": 1024, "num_attention_heads": 6,
            "num_key_value_heads": 6, "num_hidden_layers": 12},
}  # fmt: skip
BLOCKS = "model.layers.*"


def _peak_reset() -> float:
    """Reset the peak RSS of this process; return the RSS now (MB)."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def _status(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _big_model(size: str = "97m") -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SIZES[size])).eval()


def _block_linears(model: Any) -> list[str]:
    from torch import nn

    return [
        n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("model.")
    ]


def memory_case(case: str, threads: int, size: str = "97m") -> dict[str, Any]:
    import torch

    import stagecomp as sc

    torch.set_num_threads(threads)
    model = _big_model(size)
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, BIG["vocab_size"], (2, 128), generator=g)}]
    batches += [
        {"input_ids": torch.randint(0, BIG["vocab_size"], (2, 128), generator=g)} for _ in range(7)
    ]
    names = _block_linears(model)
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    base = _peak_reset()
    start, cpu = time.perf_counter(), time.process_time()
    steps = 0
    kind, _, mode = case.partition(", ")
    if kind == "allocate_ranks":
        blocks = BLOCKS if "blocks" in mode else None
        rounds = 0 if "rounds=0" in mode else 1
        sc.allocate_ranks(
            model,
            batches,
            names,
            rate=2.0,
            method="svd_id",
            rounds=rounds,
            progress=False,
            **({"blocks": blocks} if blocks else {}),
        )
    else:
        per_step = 7 if "per block" in mode else len(names)
        settings: dict[str, Any] = {"factors": kind}
        if "blocks" in mode:
            settings["blocks"] = BLOCKS
        compressor = sc.Compressor(
            model,
            sc.Reduction(2.0),
            exclude=["lm_head"],
            layers_per_step=per_step,
            calibration=sc.Calibration(batches, **settings),
            progress=False,
        )
        limit = 1 if "first step" in mode else compressor.total_steps
        while not compressor.done and steps < limit:
            compressor.compression_step()
            steps += 1
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    extra = _status("VmHWM") - base
    return {
        "case": case,
        "seconds": seconds,
        "cpu_s": cpu,
        "steps": steps,
        "model_mb": model_mb,
        "extra_mb": extra,
        "x_model": extra / model_mb,
    }


MEMORY_CASES = [
    "whiten, one step",
    "whiten, blocks",
    "gradient, one step",
    "gradient, per block first step",
    "gradient, blocks",
    "allocate_ranks, rounds=0",
    "allocate_ranks, blocks rounds=0",
    "allocate_ranks, rounds=1",
    "allocate_ranks, blocks rounds=1",
]


def _print_memory(row: dict[str, Any]) -> None:
    print(
        f"{row['case']:<34} {row['steps']:>5} {row['cpu_s']:>8.1f} {row['seconds']:>8.1f} "
        f"{row['extra_mb']:>9.0f} {row['x_model']:>7.2f} {_load():>5}",
        flush=True,
    )


# ---------------------------------------------------------------------- quality part
MODULES = (  # noqa: SIM905 (as a list literal: 130 lines of names)
    "abc argparse ast asyncio base64 bisect builtins calendar cmath cmd codecs codeop "
    "collections collections.abc colorsys concurrent.futures configparser contextlib "
    "contextvars copy csv dataclasses datetime decimal difflib dis doctest email "
    "email.message enum filecmp fnmatch fractions ftplib functools getopt gettext glob "
    "graphlib gzip hashlib heapq hmac html http.client http.server imaplib importlib "
    "inspect io ipaddress itertools json keyword locale logging lzma mailbox math "
    "mimetypes mmap multiprocessing.pool netrc numbers operator optparse os pathlib pdb "
    "pickle platform plistlib poplib pprint pydoc queue quopri random re reprlib runpy "
    "sched secrets select selectors shelve shlex shutil signal smtplib socket "
    "socketserver sqlite3 ssl stat statistics string struct subprocess symtable sys "
    "tabnanny tarfile tempfile textwrap threading time timeit tokenize trace traceback "
    "types typing unittest unittest.mock urllib.parse urllib.request uuid warnings wave "
    "weakref xml.dom.minidom xml.etree.ElementTree xmlrpc.client zipapp zipfile zipimport "
    "zlib zoneinfo"
).split()

SMALL = {
    "vocab_size": 256,
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    "use_cache": False,
}
TRAIN = {"steps": 700, "batch": 16, "length": 128, "lr": 3e-3, "warmup": 50, "seed": 0}
CALIBRATION = {"sequences": 32, "batch": 4, "seed": 1}
EVALUATION = {"windows": 256, "batch": 16}
RATES = (1.5, 2.0, 3.0, 4.0)
SETTINGS = ("weight SVD", "whiten", "gradient", "allocated")


def corpus() -> tuple[bytes, bytes]:
    """Standard-library docstrings as bytes: (training text, held-out text).

    Every docstring of the listed modules and of their public classes, methods and
    functions (``inspect.getdoc``, each once, longer than 40 characters), in a fixed
    order; every 10th is held out. The text depends on the Python version, and so does
    the cache key of the trained weights.
    """
    import importlib
    import inspect
    import warnings

    docs: list[str] = []
    seen: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in MODULES:
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
            objects: list[Any] = [module]
            for attr in sorted(vars(module)):
                obj = getattr(module, attr, None)
                if attr.startswith("_") or inspect.ismodule(obj):
                    continue
                if name != "builtins" and getattr(obj, "__module__", None) != module.__name__:
                    continue
                if inspect.isclass(obj):
                    objects.append(obj)
                    for member in sorted(vars(obj)):
                        if not member.startswith("_") and callable(getattr(obj, member, None)):
                            objects.append(getattr(obj, member))
                elif callable(obj):
                    objects.append(obj)
            for obj in objects:
                doc = inspect.getdoc(obj)
                if doc and len(doc) > 40 and doc not in seen:
                    seen.add(doc)
                    docs.append(doc)
    train = "\n\n".join(d for i, d in enumerate(docs) if i % 10 != 9)
    held_out = "\n\n".join(d for i, d in enumerate(docs) if i % 10 == 9)
    return train.encode(), held_out.encode()


def _windows(text: bytes, length: int) -> Any:
    import torch

    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    count = len(data) // length
    return data[: count * length].reshape(count, length)


def _small_model() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**SMALL))


def trained_model(threads: int) -> tuple[Any, dict[str, Any]]:
    """The small LM, trained here once and then read from ``benchmarks/.cache/``."""
    import hashlib

    import torch
    from safetensors.torch import load_file, save_file

    train, held_out = corpus()
    key = hashlib.sha256(
        json.dumps([SMALL, TRAIN], sort_keys=True).encode() + train + held_out
    ).hexdigest()[:16]
    path = CACHE / f"lm-{key}.safetensors"
    model = _small_model()
    info: dict[str, Any] = {"train_bytes": len(train), "held_out_bytes": len(held_out)}
    if path.exists():
        model.load_state_dict(load_file(str(path)))
        info["trained_s"] = None
        return model.eval(), info
    torch.set_num_threads(threads)
    torch.manual_seed(TRAIN["seed"])
    model = _small_model()
    data = torch.frombuffer(bytearray(train), dtype=torch.uint8).long()
    g = torch.Generator().manual_seed(TRAIN["seed"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=TRAIN["lr"], weight_decay=0.01)
    steps, warmup = TRAIN["steps"], TRAIN["warmup"]
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            min(1.0, (s + 1) / warmup)
            * 0.5
            * (1 + torch.cos(torch.tensor(torch.pi * s / steps)).item())
        ),
    )
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        offsets = torch.randint(0, len(data) - TRAIN["length"], (TRAIN["batch"],), generator=g)
        ids = torch.stack([data[o : o + TRAIN["length"]] for o in offsets.tolist()])
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0:
            print(f"  step {step}: loss {loss.item():.3f}", file=sys.stderr, flush=True)
    info["trained_s"] = time.perf_counter() - start
    CACHE.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model.eval(), info


def perplexity(model: Any, windows: Any) -> float:
    """exp of the mean negative log-likelihood per predicted byte."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(windows), EVALUATION["batch"]):
            ids = windows[start : start + EVALUATION["batch"]]
            logits = model(input_ids=ids).logits[:, :-1]
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
            )
            total += float(nll)
            count += ids[:, 1:].numel()
    return float(torch.exp(torch.tensor(total / count)))


def _calibration_batches(train: bytes) -> list[dict[str, Any]]:
    import torch

    data = torch.frombuffer(bytearray(train), dtype=torch.uint8).long()
    g = torch.Generator().manual_seed(CALIBRATION["seed"])
    length = TRAIN["length"]
    offsets = torch.randint(0, len(data) - length, (CALIBRATION["sequences"],), generator=g)
    ids = torch.stack([data[o : o + length] for o in offsets.tolist()])
    return [{"input_ids": chunk} for chunk in ids.split(CALIBRATION["batch"])]


def quality_row(setting: str, rate: float, threads: int) -> dict[str, Any]:
    import torch

    import stagecomp as sc

    torch.set_num_threads(threads)
    model, _ = trained_model(threads)
    train, held_out = corpus()
    windows = _windows(held_out, TRAIN["length"])[: EVALUATION["windows"]]
    batches = _calibration_batches(train)
    names = _block_linears(model)
    dense = sum(p.numel() for n in names for p in model.get_submodule(n).parameters())
    base = _peak_reset()
    start, cpu = time.perf_counter(), time.process_time()
    common: dict[str, Any] = {"exclude": ["lm_head"], "layers_per_step": 7, "progress": False}
    if setting == "dense":
        pass
    elif setting == "weight SVD":
        compressor = sc.Compressor(model, sc.Reduction(rate), **common)
    elif setting in ("whiten", "gradient"):
        calibration = sc.Calibration(batches, factors=setting, blocks=BLOCKS)
        compressor = sc.Compressor(model, sc.Reduction(rate), calibration=calibration, **common)
    else:
        ranks = sc.allocate_ranks(
            model, batches, names, rate=rate, method="svd_id", progress=False, blocks=BLOCKS
        )
        compressor = sc.Compressor(
            model,
            "manual",
            ranks={**ranks, "lm_head": None},
            methods={"*": "svd_id"},
            calibration=sc.Calibration(batches, factors="gradient", blocks=BLOCKS),
            layers_per_step=7,
            progress=False,
        )
    if setting != "dense":
        while not compressor.done:
            compressor.compression_step()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    extra = _status("VmHWM") - base
    after = sum(
        p.numel()
        for n, m in model.named_modules()
        if n.startswith("model.layers.") and not list(m.children())
        for p in m.parameters(recurse=False)
        if p.ndim == 2
    )
    return {
        "setting": setting,
        "rate": rate,
        "params_x": dense / after,
        "perplexity": perplexity(model, windows),
        "seconds": seconds,
        "cpu_s": cpu,
        "extra_mb": extra,
    }


def _print_quality(row: dict[str, Any]) -> None:
    print(
        f"{row['setting']:<12} {row['rate']:>5.1f}x {row['params_x']:>7.2f}x "
        f"{row['perplexity']:>10.3f} {row['cpu_s']:>7.1f} {row['seconds']:>7.1f} "
        f"{row['extra_mb']:>8.0f} {_load():>5}",
        flush=True,
    )


# ---------------------------------------------------------------------- driver
def _load() -> str:
    """The one-minute load average now (the machine may be shared)."""
    return f"{os.getloadavg()[0]:.1f}"


def _run_row(part: str, spec: dict[str, Any], threads: int) -> dict[str, Any] | None:
    command = [
        sys.executable,
        __file__,
        "--row",
        json.dumps({"part": part, **spec}),
        "--threads",
        str(threads),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"{part} {spec}: failed\n{result.stderr[-3000:]}", flush=True)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["quality", "memory", "all"], default="quality")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cases", nargs="*", default=None, help="memory cases to run")
    parser.add_argument("--size", choices=sorted(SIZES), default="97m", help="memory part")
    parser.add_argument("--rates", nargs="*", type=float, default=list(RATES))
    parser.add_argument("--row", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row is not None:
        spec = json.loads(args.row)
        if spec.pop("part") == "memory":
            print(json.dumps(memory_case(spec["case"], args.threads, spec.get("size", "97m"))))
        else:
            print(json.dumps(quality_row(spec["setting"], spec["rate"], args.threads)))
        return
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    command = shlex.join(["python", "benchmarks/bench_lm.py", *sys.argv[1:]])
    print(f"# {command}   ({now}, {os.cpu_count()} CPUs, load average {load} at the start)")
    if args.part in ("quality", "all"):
        model, info = trained_model(args.threads)
        trained = "cached" if info["trained_s"] is None else f"{info['trained_s']:.0f} s"
        print(
            f"quality: Llama-like byte LM, {sum(p.numel() for p in model.parameters()):,} "
            f"parameters, trained on {info['train_bytes']:,} bytes of standard-library "
            f"docstrings ({trained}), held-out perplexity per byte on "
            f"{EVALUATION['windows']} x {TRAIN['length']} bytes; {args.threads} thread(s)"
        )
        header = f"{'setting':<12} {'target':>6} {'params x':>8} {'perplexity':>10}"
        print(f"{header} {'CPU s':>7} {'wall s':>7} {'peak MB':>8} {'load':>5}")
        dense = _run_row("quality", {"setting": "dense", "rate": 1.0}, args.threads)
        if dense is not None:
            _print_quality(dense)
        for rate in args.rates:
            for setting in SETTINGS:
                row = _run_row("quality", {"setting": setting, "rate": rate}, args.threads)
                if row is not None:
                    _print_quality(row)
    if args.part in ("memory", "all"):
        model = _big_model(args.size)
        params = sum(p.numel() for p in model.parameters())
        blocks = len(model.model.layers)
        del model
        print(
            f"memory: Llama-like, {params / 1e6:.1f}M parameters (random weights), "
            f"{7 * blocks} block Linear layers at 2x, 8 batches of 2 x 128 tokens, "
            f"{args.threads} thread(s)"
        )
        print(
            f"{'case':<34} {'steps':>5} {'CPU s':>8} {'wall s':>8} {'extra MB':>9} {'x model':>7} "
            f"{'load':>5}"
        )
        for case in args.cases or MEMORY_CASES:
            row = _run_row("memory", {"case": case, "size": args.size}, args.threads)
            if row is not None:
                _print_memory(row)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"# load average at the end: {load}")


if __name__ == "__main__":
    main()
