"""Which Linear and Conv2d modules are plain enough to be replaced by a factorisation.

A decomposed layer computes the stock ``nn.Linear`` / ``nn.Conv2d`` function of the
weight it was fitted to. A subclass with its own ``forward`` (quantisation-aware
``ConvBn2d``, a weight-standardised convolution, any user layer) computes something
else, so replacing it would change the model's output even at full rank, silently.
A layer whose weight is computed (a parametrization, ``weight_norm``) or whose state
dict is rewritten by hooks would lose that code. The plan skips such layers with the
reason this module gives; forward and backward hooks, which only see a layer's inputs
and outputs, move to the new layer instead (``stagecomp.surgery.replace_module``).
"""

from __future__ import annotations

from torch import nn

_STOCK_CODE: tuple[tuple[type[nn.Module], tuple[str, ...]], ...] = (
    (nn.Conv2d, ("forward", "_conv_forward")),
    (nn.Linear, ("forward",)),
)
"""The methods whose stock versions define what a Linear / Conv2d computes."""

_STATE_DICT_HOOKS = (
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)

OPT_IN = "name the layer exactly in methods= or ranks= to replace it anyway"
"""How a user asks for a layer with its own forward to be replaced all the same."""


def custom_code(module: nn.Module) -> str | None:
    """Why ``module`` does not compute the stock Linear / Conv2d function, or ``None``.

    Only the class's (and instance's) ``forward`` is compared with the stock one
    (``_conv_forward`` too for convolutions): a subclass that only adds attributes or
    changes construction is plain.
    """
    for base, names in _STOCK_CODE:
        if not isinstance(module, base):
            continue
        for attr in names:
            if attr in vars(module):
                return f"its {attr} is replaced on the instance"
            if getattr(type(module), attr) is not getattr(base, attr):
                owner = next(k for k in type(module).__mro__ if attr in vars(k))
                return (
                    f"{type(module).__name__} computes its own {attr} ({owner.__module__}."
                    f"{owner.__qualname__}), not the stock {base.__name__}'s: a factorisation "
                    "of its weight would change what it computes"
                )
    return None


def fixed_code(module: nn.Module) -> str | None:
    """Why replacing ``module`` would drop code attached to its weights, or ``None``.

    A computed weight (``torch.nn.utils.parametrize``, ``weight_norm``,
    ``spectral_norm``) and state-dict hooks belong to the layer's own parameters; a
    decomposed layer has other parameters, so no opt-in can keep them.
    """
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        return (
            "it is a lazy layer whose shape is not known yet: run one forward pass before "
            "compressing it"
        )
    parametrizations = getattr(module, "parametrizations", None)
    if isinstance(parametrizations, nn.ModuleDict) and len(parametrizations):
        names = ", ".join(parametrizations.keys())
        return (
            f"its {names} is computed by a parametrization; remove it first "
            "(torch.nn.utils.parametrize.remove_parametrizations) to compress this layer"
        )
    if isinstance(module, (nn.Linear, nn.Conv2d)) and not isinstance(
        module._parameters.get("weight"), nn.Parameter
    ):
        return (
            "its weight is computed, not a parameter (weight_norm or spectral_norm); remove "
            "that first (torch.nn.utils.remove_weight_norm / remove_spectral_norm)"
        )
    hooked = [name.strip("_") for name in _STATE_DICT_HOOKS if getattr(module, name, None)]
    if hooked:
        return (
            f"it has {' and '.join(hooked)}, written for its own parameter names, which a "
            "decomposed layer does not have"
        )
    return None


__all__ = ["OPT_IN", "custom_code", "fixed_code"]
