"""Tucker2: the decomposition math, its recompression, and the Tucker2Conv2d layer."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from stagecomp.decompositions.tucker2 import tucker2, tucker2_dense, tucker2_recompress
from stagecomp.errors import NonFiniteWeightError, RankError
from stagecomp.layer_shape import LayerShape
from stagecomp.layers.tucker2_conv2d import Tucker2Conv2d
from stagecomp.options import DecomposeOptions

F64 = torch.float64


@torch.no_grad()
def rel_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx - exact).norm() / exact.norm())


def random_kernel(shape: tuple[int, ...], seed: int = 0, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def low_rank_kernel(out: int, inp: int, k: int, r_out: int, r_in: int, seed: int = 0):
    """A kernel of multilinear rank exactly (r_out, r_in), with non-orthonormal factors."""
    g = torch.Generator().manual_seed(seed)
    core = torch.randn(r_out, r_in, k, k, generator=g, dtype=F64)
    u_out = torch.randn(out, r_out, generator=g, dtype=F64)
    u_in = torch.randn(inp, r_in, generator=g, dtype=F64)
    return tucker2_dense(core, u_out, u_in)


def conv(seed: int = 0, dtype: torch.dtype = F64, **kwargs) -> nn.Conv2d:
    torch.manual_seed(seed)
    return nn.Conv2d(dtype=dtype, **kwargs)


GEOMETRIES = {
    "plain": dict(in_channels=8, out_channels=12, kernel_size=3, padding=1),
    "groups_asym_stride": dict(
        in_channels=8, out_channels=12, kernel_size=3, stride=(2, 1), padding=(1, 0), groups=2
    ),
    "same_even_dilated": dict(
        in_channels=6, out_channels=10, kernel_size=(2, 4), padding="same", dilation=(2, 1)
    ),
    "valid_no_bias": dict(
        in_channels=5, out_channels=7, kernel_size=3, padding="valid", bias=False
    ),
    "reflect": dict(
        in_channels=6, out_channels=9, kernel_size=3, padding=2, dilation=2, padding_mode="reflect"
    ),
    "circular_groups": dict(
        in_channels=12,
        out_channels=6,
        kernel_size=(3, 2),
        padding=(1, 1),
        stride=(1, 2),
        groups=3,
        padding_mode="circular",
    ),
    "replicate": dict(
        in_channels=4, out_channels=4, kernel_size=5, padding=2, padding_mode="replicate"
    ),
    "depthwise": dict(in_channels=6, out_channels=6, kernel_size=3, padding=1, groups=6),
    "pointwise": dict(in_channels=9, out_channels=5, kernel_size=1),
}


# ------------------------------------------------------------------- the math
@pytest.mark.parametrize("hooi_iters", [0, 1, 3])
@pytest.mark.parametrize("shape", [(7, 5, 3, 2), (12, 3, 1, 1), (3, 12, 1, 1), (20, 2, 3, 1)])
def test_full_rank_is_exact(hooi_iters, shape):
    # The 1x1 and (20, 2) kernels have tall unfoldings: QR path, null-space vectors included.
    kernel = random_kernel(shape)
    out, inp = shape[:2]
    core, u_out, u_in = tucker2(kernel, (out, inp), hooi_iters=hooi_iters)
    assert core.shape == shape and u_out.shape == (out, out) and u_in.shape == (inp, inp)
    assert rel_error(tucker2_dense(core, u_out, u_in), kernel) < 1e-12
    assert torch.allclose(u_out.T @ u_out, torch.eye(out, dtype=F64), atol=1e-12)
    assert torch.allclose(u_in.T @ u_in, torch.eye(inp, dtype=F64), atol=1e-12)


@pytest.mark.parametrize("hooi_iters", [0, 1])
def test_recovers_exact_multilinear_rank(hooi_iters):
    kernel = low_rank_kernel(20, 16, 3, r_out=6, r_in=4, seed=1)
    core, u_out, u_in = tucker2(kernel, (6, 4), hooi_iters=hooi_iters)
    assert core.shape == (6, 4, 3, 3)
    assert rel_error(tucker2_dense(core, u_out, u_in), kernel) < 1e-5
    eye = torch.eye
    assert torch.allclose(u_out.T @ u_out, eye(6, dtype=F64), atol=1e-12)
    assert torch.allclose(u_in.T @ u_in, eye(4, dtype=F64), atol=1e-12)


def test_hooi_never_worse_than_hosvd():
    kernel = random_kernel((24, 20, 3, 3), seed=2)
    errors = [
        rel_error(tucker2_dense(*tucker2(kernel, (8, 6), hooi_iters=n)), kernel) for n in (0, 1, 5)
    ]
    assert errors[1] <= errors[0] + 1e-12
    assert errors[2] <= errors[1] + 1e-12
    assert errors[2] < errors[0]  # a random kernel leaves HOOI something to gain


def noisy_low_rank_kernel() -> torch.Tensor:
    """Multilinear rank (10, 8) plus 30% noise: HOOI below that rank has work to do."""
    kernel = low_rank_kernel(40, 32, 3, r_out=10, r_in=8, seed=7)
    noise = random_kernel(kernel.shape, seed=8)
    return kernel / kernel.norm() + 0.3 * noise / noise.norm()


def hooi_sweeps(caplog: pytest.LogCaptureFixture) -> list[int]:
    """Sweep counts from tucker2's debug records, one per call."""
    return [int(r.args[2]) for r in caplog.records if "HOOI sweeps" in r.msg]  # type: ignore[index]


def test_hooi_to_tolerance_beats_one_sweep_and_stops_early(caplog):
    kernel, ranks = noisy_low_rank_kernel(), (6, 5)

    def error(**options) -> float:
        return rel_error(tucker2_dense(*tucker2(kernel, ranks, **options)), kernel)

    with caplog.at_level(logging.DEBUG, logger="stagecomp.decompositions.tucker2"):
        hosvd = error(hooi_iters=0)
        one = error(hooi_iters=1)
        converged = error()  # the defaults: to a tolerance of 1e-4, at most 30 sweeps
        fixed = error(hooi_iters=30, hooi_tol=0)
    assert hosvd == pytest.approx(0.57465, abs=5e-5)
    assert one == pytest.approx(0.57097, abs=5e-5)
    assert converged == pytest.approx(0.57077, abs=5e-5)
    assert converged <= one <= hosvd
    assert converged - fixed < 1e-6  # 30 sweeps gain nothing more worth having
    # hooi_iters=0 logs nothing; one sweep, then early stop, then all 30.
    sweeps = hooi_sweeps(caplog)
    assert sweeps[0] == 1 and sweeps[2] == 30
    assert 2 <= sweeps[1] <= 5


def test_hooi_stops_early_when_exact(caplog):
    kernel = low_rank_kernel(20, 16, 3, r_out=6, r_in=4, seed=1)
    with caplog.at_level(logging.DEBUG, logger="stagecomp.decompositions.tucker2"):
        factors = tucker2(kernel, (6, 4))  # exact after one sweep; the second one sees it
        tucker2(torch.zeros(6, 4, 3, 3, dtype=F64), (2, 2))  # error 0: stop at once
    assert rel_error(tucker2_dense(*factors), kernel) < 1e-5
    assert hooi_sweeps(caplog) == [2, 1]


def test_deterministic_and_sign_fixed():
    kernel = random_kernel((16, 12, 3, 3), seed=3)
    first = tucker2(kernel, (5, 4))
    second = tucker2(kernel.clone(), (5, 4))
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    for u in first[1:]:
        top = u.gather(0, u.abs().argmax(0, keepdim=True))
        assert (top > 0).all()


def _tensorly_partial_tucker(kernel: np.ndarray, ranks: tuple[int, int], iters: int):
    """tensorly's result as (core, [u_out, u_in]), whichever return form its version has."""
    tl_tucker = pytest.importorskip("tensorly.decomposition")
    result = tl_tucker.partial_tucker(
        kernel, rank=list(ranks), modes=[0, 1], n_iter_max=iters, tol=0
    )
    if isinstance(result[0], tuple):  # tensorly >= 0.9: ((core, factors), errors)
        result = result[0]
    core, factors = result
    core, factors = np.asarray(core), [np.asarray(f) for f in factors]
    assert core.shape == (*ranks, *kernel.shape[2:])
    assert [f.shape for f in factors] == [(kernel.shape[0], ranks[0]), (kernel.shape[1], ranks[1])]
    return core, factors


@pytest.mark.parametrize("iters", [0, 1, 3])
@pytest.mark.parametrize(
    ("kind", "shape", "ranks"),
    [
        ("random", (18, 14, 3, 3), (7, 5)),
        ("decaying", (18, 14, 3, 3), (7, 5)),
        ("random", (40, 6, 1, 1), (5, 4)),  # tall unfoldings: the QR path
        ("decaying", (6, 40, 1, 1), (4, 5)),
        ("random", (30, 8, 1, 1), (12, 3)),  # r_out > r_in: null-space vectors in HOOI
    ],
)
@pytest.mark.filterwarnings("ignore:Trying to compute SVD with n_eigenvecs")
def test_no_worse_than_tensorly(iters, kind, shape, ranks):
    kernel = random_kernel(shape, seed=4)
    if kind == "decaying":
        kernel = kernel * torch.logspace(0, -2, shape[0], dtype=F64)[:, None, None, None]
    core, (a, b) = _tensorly_partial_tucker(kernel.numpy(), ranks, iters)
    theirs = np.linalg.norm(np.einsum("rskl,or,is->oikl", core, a, b) - kernel.numpy())
    theirs /= np.linalg.norm(kernel.numpy())
    ours = rel_error(tucker2_dense(*tucker2(kernel, ranks, hooi_iters=iters, hooi_tol=0)), kernel)
    assert ours <= theirs + 1e-6


def test_float32_close_to_float64():
    kernel = random_kernel((64, 48, 3, 3), seed=5)
    kernel = kernel * torch.logspace(0, -3, 64, dtype=F64)[:, None, None, None]
    err64 = rel_error(tucker2_dense(*tucker2(kernel, (24, 20))), kernel)
    factors32 = tucker2(kernel.float(), (24, 20))
    assert all(f.dtype == torch.float32 for f in factors32)
    err32 = rel_error(tucker2_dense(*factors32).double(), kernel)
    assert abs(err32 - err64) < 1e-4 * max(err64, 1e-3)


@pytest.mark.parametrize("hooi_iters", [0, 2])
def test_recompress_equals_tucker2_of_dense(hooi_iters):
    g = torch.Generator().manual_seed(6)
    core = torch.randn(9, 7, 3, 3, generator=g, dtype=F64)
    u_out = torch.randn(20, 9, generator=g, dtype=F64)  # not orthonormal: as after fine-tuning
    u_in = torch.randn(16, 7, generator=g, dtype=F64)
    dense = tucker2_dense(core, u_out, u_in)
    for ranks in [(5, 3), (9, 7), (12, 10)]:
        expected = tucker2(dense, ranks, hooi_iters=hooi_iters)
        got = tucker2_recompress(core, u_out, u_in, ranks, hooi_iters=hooi_iters)
        assert [t.shape for t in got] == [t.shape for t in expected]
        assert rel_error(tucker2_dense(*got), tucker2_dense(*expected)) < 1e-9
        if ranks[0] <= 9 and ranks[1] <= 7:  # beyond the current ranks the basis is free
            for a, b in zip(got, expected, strict=True):
                assert rel_error(a, b) < 1e-8


def test_bad_arguments():
    kernel = random_kernel((6, 4, 3, 3))
    with pytest.raises(ValueError, match="out of range"):
        tucker2(kernel, (7, 2))
    with pytest.raises(ValueError, match="out of range"):
        tucker2(kernel, (2, 0))
    with pytest.raises(ValueError, match="conv kernel"):
        tucker2(kernel[0], (2, 2))
    with pytest.raises(ValueError, match="hooi_iters"):
        tucker2(kernel, (2, 2), hooi_iters=-1)
    with pytest.raises(ValueError, match="hooi_tol"):
        tucker2(kernel, (2, 2), hooi_tol=float("nan"))


# ------------------------------------------------------------------- the layer
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_layer_full_rank_matches_conv(name):
    dense = conv(**GEOMETRIES[name])
    shape = LayerShape.from_module(dense)
    full = Tucker2Conv2d.full_rank(shape, DecomposeOptions())
    layer = Tucker2Conv2d.from_module(dense, full)
    assert layer.ranks == full == (shape.out_per_group, shape.in_per_group)
    x = torch.randn(
        2, dense.in_channels, 9, 11, generator=torch.Generator().manual_seed(1), dtype=F64
    )
    expected = dense(x)
    assert rel_error(layer(x), expected) < 1e-5
    assert rel_error(layer.to_dense()(x), expected) < 1e-5
    assert rel_error(layer.dense_weight(), dense.weight) < 1e-10
    assert (layer.dense_bias() is None) == (dense.bias is None)


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_param_count_is_real(name):
    shape = LayerShape.from_module(conv(**GEOMETRIES[name]))
    options = DecomposeOptions()
    full = Tucker2Conv2d.full_rank(shape, options)
    for ranks in [full, (1, 1), (max(1, full[0] - 1), max(1, full[1] // 2))]:
        layer = Tucker2Conv2d(shape, ranks, options)
        real = sum(p.numel() for p in layer.parameters())
        assert Tucker2Conv2d.param_count(shape, ranks, options) == real


def test_layer_recovers_low_rank_conv():
    dense = conv(in_channels=16, out_channels=20, kernel_size=3, padding=1)
    with torch.no_grad():
        dense.weight.copy_(low_rank_kernel(20, 16, 3, r_out=6, r_in=4, seed=7))
    layer = Tucker2Conv2d.from_module(dense, (6, 4))
    assert layer.core.weight.shape == (6, 4, 3, 3)
    x = torch.randn(1, 16, 8, 8, dtype=F64)
    assert rel_error(layer(x), dense(x)) < 1e-5


def test_options_default_to_hooi_to_tolerance():
    options = DecomposeOptions()
    assert (options.hooi_iters, options.hooi_tol) == (30, 1e-4)
    assert DecomposeOptions.from_dict(options.to_dict()) == options
    saved = {k: v for k, v in options.to_dict().items() if k != "hooi_tol"}  # an older recipe
    assert DecomposeOptions.from_dict({**saved, "hooi_iters": 1}).hooi_iters == 1


def test_layer_default_iterates_hooi():
    dense = conv(in_channels=32, out_channels=40, kernel_size=3, padding=1)
    with torch.no_grad():
        dense.weight.copy_(noisy_low_rank_kernel())

    def error(options: DecomposeOptions) -> float:
        layer = Tucker2Conv2d.from_module(dense, (6, 5), options=options)
        return rel_error(layer.dense_weight(), dense.weight)

    default, one = error(DecomposeOptions()), error(DecomposeOptions(hooi_iters=1))
    assert default == pytest.approx(0.57077, abs=5e-5)
    assert one == pytest.approx(0.57097, abs=5e-5)


def test_layer_uses_hooi_tol():
    dense = conv(in_channels=32, out_channels=40, kernel_size=3, padding=1)
    with torch.no_grad():
        dense.weight.copy_(noisy_low_rank_kernel())
    loose, tight = (
        Tucker2Conv2d.from_module(dense, (6, 5), options=DecomposeOptions(hooi_tol=tol))
        for tol in (1e-1, 0.0)
    )
    assert not torch.equal(loose.dense_weight(), tight.dense_weight())


def test_layer_keeps_device_dtype_mode_and_grad():
    dense = conv(dtype=torch.float32, in_channels=8, out_channels=8, kernel_size=3, padding=1)
    dense.eval()
    layer = Tucker2Conv2d.from_module(dense, 4)
    assert layer.ranks == (4, 4)
    assert not layer.training
    assert all(p.dtype == torch.float32 and p.requires_grad for p in layer.parameters())
    layer(torch.randn(2, 8, 5, 5)).sum().backward()
    assert all(p.grad is not None for p in layer.parameters())


def test_layer_rejects_bad_ranks():
    dense = conv(in_channels=8, out_channels=6, kernel_size=3, groups=2)
    with pytest.raises(RankError):
        Tucker2Conv2d.from_module(dense, (4, 2))  # out per group is 3
    with pytest.raises(RankError):
        Tucker2Conv2d.from_module(dense, (2, 0))


@pytest.mark.parametrize("hooi_iters", [0, 1])
@pytest.mark.parametrize("groups", [1, 2])
def test_recompressed_equals_decompose_of_dense(hooi_iters, groups):
    options = DecomposeOptions(hooi_iters=hooi_iters)
    dense = conv(in_channels=16, out_channels=20, kernel_size=3, padding=1, groups=groups)
    layer = Tucker2Conv2d.from_module(dense, (8, 6), options)
    with torch.no_grad():  # fine-tuning leaves the factors non-orthonormal
        g = torch.Generator().manual_seed(8)
        for p in layer.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=F64))
    layer.eval()
    x = torch.randn(2, 16, 7, 7, generator=g, dtype=F64)
    for ranks in [(4, 3), (8, 6), (10, 8)]:
        smaller = layer.recompressed(ranks)
        expected = Tucker2Conv2d.from_module(layer.to_dense(), ranks, options)
        assert smaller.ranks == ranks and not smaller.training
        assert rel_error(smaller.dense_weight(), expected.dense_weight()) < 1e-9
        assert rel_error(smaller(x), expected(x)) < 1e-9
        assert torch.equal(smaller.dense_bias(), layer.dense_bias())
    assert rel_error(layer.recompressed((8, 6))(x), layer(x)) < 1e-10


def test_recompressed_rejects_non_finite():
    layer = Tucker2Conv2d.from_module(conv(in_channels=4, out_channels=4, kernel_size=3), 2)
    with torch.no_grad():
        layer.core.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteWeightError):
        layer.recompressed(1)


def test_float32_layer_uses_float32_path_and_stays_accurate():
    torch.manual_seed(9)
    dense = nn.Conv2d(128, 256, 3, padding=1)  # 294912 weights: decomposed in float32
    layer32 = Tucker2Conv2d.from_module(dense, (96, 64))
    layer64 = Tucker2Conv2d.from_module(dense.double(), (96, 64))
    weight = dense.weight.double()
    err32 = rel_error(layer32.dense_weight().double(), weight)
    err64 = rel_error(layer64.dense_weight(), weight)
    assert layer32.core.weight.dtype == torch.float32
    assert abs(err32 - err64) < 1e-4


def test_empty_layer_init_matches_dense_std():
    torch.manual_seed(10)
    for kwargs, ranks in [
        (dict(in_channels=64, out_channels=64, kernel_size=3), (16, 16)),
        (dict(in_channels=32, out_channels=48, kernel_size=3, groups=2), (8, 12)),
    ]:
        reference = nn.Conv2d(**kwargs).weight.std().item()
        shape = LayerShape.from_module(nn.Conv2d(**kwargs))
        layer = Tucker2Conv2d(shape, ranks)
        std = layer.to_dense().weight.std().item()
        assert reference / 1.5 < std < reference * 1.5
