"""Which modules are layers stagecomp can decompose, and how to read their weight.

Besides ``nn.Linear`` and ``nn.Conv2d``, two common layers compute a plain matrix
product or a convolution that a decomposition can replace:

* ``transformers.pytorch_utils.Conv1D`` (GPT-2 and its relatives): a Linear whose
  ``weight`` is stored transposed, ``(in, out)``. It is recognised lazily, by its
  class name, the module it comes from and its ``nf`` attribute, so that stagecomp
  never imports transformers.
* ``nn.Conv1d`` (Whisper's input convolutions, Wav2Vec2's feature extractor): decomposed
  as a Conv2d with a ``(1, k)`` kernel.

Every other layer with a weight that looks decomposable (Conv3d, transposed
convolutions, Embedding, Bilinear) is listed with the reason it is left alone, so a
plan never skips a layer silently.
"""

from __future__ import annotations

import torch
from torch import nn


def is_transposed_linear(module: nn.Module) -> bool:
    """True for ``transformers.pytorch_utils.Conv1D``: a Linear with an ``(in, out)`` weight."""
    cls = type(module)
    weight = getattr(module, "weight", None)
    return (
        cls.__name__ == "Conv1D"
        and cls.__module__.startswith("transformers")
        and isinstance(getattr(module, "nf", None), int)
        and isinstance(weight, torch.Tensor)
        and weight.ndim == 2
    )


def is_plain_layer(module: nn.Module) -> bool:
    """A dense layer stagecomp decomposes: Linear, Conv2d, Conv1d or a Hugging Face Conv1D."""
    if isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv1d)):
        return True
    return is_transposed_linear(module)


def plain_weight(module: nn.Module) -> torch.Tensor:
    """The weight in PyTorch's own layout, ``(out, in)`` or ``(out, in/g, *kernel)``.

    A Hugging Face ``Conv1D`` keeps ``(in, out)``; its transpose (a view) is returned,
    so every decomposition reads the same layout.
    """
    weight = module.weight
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(module).__name__} has no weight tensor")
    return weight.T if is_transposed_linear(module) else weight


_UNSUPPORTED: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.Conv3d, "3-D convolutions are not decomposed"),
    (nn.ConvTranspose1d, "transposed convolutions are not decomposed"),
    (nn.ConvTranspose2d, "transposed convolutions are not decomposed"),
    (nn.ConvTranspose3d, "transposed convolutions are not decomposed"),
    (nn.Embedding, "embeddings are lookup tables, not decomposed"),
    (nn.EmbeddingBag, "embeddings are lookup tables, not decomposed"),
    (nn.Bilinear, "bilinear layers are not decomposed"),
)


def unsupported_reason(module: nn.Module) -> str | None:
    """Why a layer with a weight is not decomposed, for kinds stagecomp knows it leaves alone.

    Lazy layers whose shape is not known yet are reported too: they become
    decomposable after one forward pass.
    """
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        return (
            f"a lazy {type(module).__name__} whose shape is not known yet: run one forward "
            "pass before building the Compressor"
        )
    for cls, reason in _UNSUPPORTED:
        if isinstance(module, cls):
            return f"{type(module).__name__}: {reason}"
    return None


__all__ = ["is_plain_layer", "is_transposed_linear", "plain_weight", "unsupported_reason"]
