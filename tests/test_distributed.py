"""Compression under torch.distributed: 2 gloo ranks on CPU share steps and stay identical.

The spawned run does what a DDP user does: two compression steps of the
digits CNN, each followed by a short fine-tune in a freshly wrapped DDP with a
new optimizer, then a resume from the files saved after the first fine-tune.
Every rank must hold bit-identical parameters after every step, and the result
must equal a single process that runs the same steps and emulates DDP's
gradient averaging."""

from __future__ import annotations

import copy
import socket
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import stagecomp as sc
import stagecomp.compressor as compressor_module
from stagecomp.digits import DigitsCNN, DigitsData, load_digits_data
from stagecomp.distributed import (
    assert_same_parameters,
    assign_layers,
    broadcast_module_,
    layer_cost,
    parameters_digest,
    use_distributed,
)
from stagecomp.layer_shape import LayerShape

WORLD = 2
SPAWN_TIMEOUT_S = 90.0  # the whole run; a hang fails the test instead of blocking CI
GROUP_TIMEOUT = timedelta(seconds=30)  # a collective waiting on a dead rank gives up
FINETUNE_BATCHES = 4
GLOBAL_BATCH = 64


def _model() -> DigitsCNN:
    torch.manual_seed(0)
    return DigitsCNN()


def _compressor(model: nn.Module) -> sc.Compressor:
    # conv2, conv3 in step 1; fc1, fc2 in step 2 (conv1 has one input channel).
    return sc.Compressor(model, "reduction", layers_per_step=2, progress=False)


def _two_stages_in_one_step(model: nn.Module) -> sc.Compressor:
    return sc.Compressor(model, "reduction", layers_per_step=8, stages=2, progress=False)


def _data_aware(model: nn.Module, data: DigitsData) -> sc.Compressor:
    calibration = [data.train_x[i : i + 128] for i in range(0, 512, 128)]
    return sc.Compressor(
        model,
        "reduction",
        layers_per_step=2,
        calibration=sc.Calibration(calibration, factors="whiten"),
        progress=False,
    )


def _batches(data: DigitsData) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    order = torch.randperm(len(data.train_y), generator=generator)
    return [order[i * GLOBAL_BATCH : (i + 1) * GLOBAL_BATCH] for i in range(FINETUNE_BATCHES)]


def _optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def _train_mode(model: nn.Module) -> None:
    # BatchNorm statistics frozen: per-rank batch statistics are not what one
    # process sees on the whole batch (SyncBatchNorm would be needed).
    model.train()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eval()


def _finetune_ddp(wrapped: nn.Module, data: DigitsData, rank: int) -> None:
    """Fine-tune a DDP or FSDP model on this rank's half of every global batch."""
    optimizer = _optimizer(wrapped.parameters())
    _train_mode(wrapped)
    for idx in _batches(data):
        local = idx[rank::WORLD]
        optimizer.zero_grad()
        F.cross_entropy(wrapped(data.train_x[local]), data.train_y[local]).backward()
        optimizer.step()


def _finetune_single(model: nn.Module, data: DigitsData) -> None:
    """What DDP computes, in one process: each rank's gradient, averaged."""
    optimizer = _optimizer(model.parameters())
    _train_mode(model)
    params = [p for p in model.parameters() if p.requires_grad]
    for idx in _batches(data):
        grads = []
        for rank in range(WORLD):
            local = idx[rank::WORLD]
            optimizer.zero_grad()
            F.cross_entropy(model(data.train_x[local]), data.train_y[local]).backward()
            grads.append([p.grad.clone() for p in params])  # type: ignore[union-attr]
        for i, p in enumerate(params):
            # DDP divides each rank's gradient by the world size, then all-reduces a sum.
            p.grad = sum(g[i] / WORLD for g in grads)  # type: ignore[assignment]
        optimizer.step()


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _fsdp_run(rank: int, data: DigitsData) -> dict[str, Any]:
    """The FSDP2 how-to: gather the full weights, compress a plain copy, re-shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    full_state = StateDictOptions(full_state_dict=True)
    plain = _model()
    compressor = _compressor(plain)

    def shard() -> nn.Module:
        model = copy.deepcopy(plain)
        for name in ("conv2", "conv3", "fc1"):
            fully_shard(model.get_submodule(name))
        fully_shard(model)
        return model

    sharded = shard()
    fc1_weight: Any = sharded.get_submodule("fc1").weight  # a DTensor shard
    local_rows = fc1_weight.to_local().shape[0]
    resharded_equal = []
    while not compressor.done:
        _finetune_ddp(sharded, data, rank)
        plain.load_state_dict(get_model_state_dict(sharded, options=full_state))
        broadcast_module_(plain)  # BatchNorm buffers are per rank under FSDP
        del sharded
        compressor.compression_step()
        assert_same_parameters(plain)
        sharded = shard()
        regathered: dict[str, Any] = get_model_state_dict(sharded, options=full_state)
        resharded_equal.append(
            all(torch.equal(v, regathered[k]) for k, v in plain.state_dict().items())
        )
    return {
        "fsdp_local_rows": local_rows,
        "fsdp_resharded_equal": resharded_equal,
        "fsdp_decomposed": sum(isinstance(m, sc.DecomposedLayer) for m in plain.modules()),
        "fsdp_state": _state(plain),
    }


def _worker(rank: int, port: int, out: str, data: DigitsData) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=GROUP_TIMEOUT,
    )
    try:
        results: dict[str, Any] = {}
        model = _model()
        compressor = _compressor(model)
        decomposed_here: list[str] = []
        compress = compressor_module.run_layer_job

        def counting(module: Any, target: Any, *rest: Any) -> Any:
            decomposed_here.append(target.name)
            return compress(module, target, *rest)

        def failing(module: Any, target: Any, *rest: Any) -> Any:
            if rank == 1:
                raise RuntimeError(f"injected failure at {target.name}")
            return counting(module, target, *rest)

        # A failure on one rank: every rank raises and keeps the model as it was.
        before = parameters_digest(model)
        compressor_module.run_layer_job = failing  # type: ignore[assignment]
        try:
            compressor.compression_step()
        except Exception as error:
            results["failure"] = (type(error).__name__, str(error))
        results["unchanged_after_failure"] = parameters_digest(model) == before
        results["step_index_after_failure"] = compressor.step_index
        decomposed_here.clear()

        # Ranks that disagree on the step (other Compressor arguments) refuse it.
        other = sc.Compressor(model, "reduction", layers_per_step=1 + rank, progress=False)
        try:
            other.compression_step()
        except sc.StagecompError as error:
            results["disagreement"] = (type(error).__name__, str(error))
        results["unchanged_after_disagreement"] = parameters_digest(model) == before

        compressor_module.run_layer_job = counting  # type: ignore[assignment]
        step1 = compressor.compression_step()
        assert_same_parameters(model)
        results["step1_local"] = list(decomposed_here)
        results["step1_changes"] = [c.to_dict() for c in step1.changes]
        results["step1_state"] = _state(model)

        ddp = DDP(model)
        _finetune_ddp(ddp, data, rank)
        assert_same_parameters(model)
        results["finetuned_state"] = _state(model)
        saved = Path(out) / "resume.pt"
        if rank == 0:  # what an interrupted run left behind
            torch.save({"compressor": compressor.state_dict(), "model": model.state_dict()}, saved)

        # Step 2 on the same model: unwrap, compress, re-wrap, new optimizer.
        del ddp
        decomposed_here.clear()
        compressor.compression_step()
        assert_same_parameters(model)
        results["step2_local"] = list(decomposed_here)
        results["step2_state"] = _state(model)
        ddp = DDP(model)
        _finetune_ddp(ddp, data, rank)
        assert_same_parameters(model)
        results["final_state"] = _state(model)
        results["done"] = compressor.done
        del ddp

        # Resume: every rank rebuilds from rank 0's files and runs step 2 again.
        dist.barrier()
        model = _model()
        compressor = _compressor(model)
        state = torch.load(saved, weights_only=True)
        compressor.load_state_dict(state["compressor"])
        model.load_state_dict(state["model"])
        assert_same_parameters(model)
        results["resumed_equal"] = all(
            torch.equal(v, results["finetuned_state"][k]) for k, v in model.state_dict().items()
        )
        compressor.compression_step()
        _finetune_ddp(DDP(model), data, rank)
        assert_same_parameters(model)
        results["resumed_final_state"] = _state(model)
        results.update(_fsdp_run(rank, data))

        # Both stages in one step: each layer twice, on the same rank, in plan order.
        model = _model()
        twice = _two_stages_in_one_step(model)
        results["two_stages_changes"] = [c.to_dict() for c in twice.compression_step().changes]
        assert_same_parameters(model)
        results["two_stages_state"] = _state(model)

        # Data-aware factors: every rank calibrates, then the layers are shared.
        model = _model()
        aware = _data_aware(model, data)
        while not aware.done:
            aware.compression_step()
            assert_same_parameters(model)
        results["data_aware_state"] = _state(model)
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _spawn(out: Path, data: DigitsData) -> list[dict[str, Any]]:
    context = mp.start_processes(
        _worker,
        args=(_free_port(), str(out), data),  # passed in: the ranks need not import sklearn
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD} ranks did not finish within {SPAWN_TIMEOUT_S} s")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _assert_equal_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == []


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return _spawn(tmp_path_factory.mktemp("distributed"), load_digits_data(0))


def test_failure_on_one_rank_raises_everywhere_and_rolls_back(
    ranks: list[dict[str, Any]],
) -> None:
    kind0, message0 = ranks[0]["failure"]
    kind1, message1 = ranks[1]["failure"]
    assert kind0 == "DistributedError"
    assert "rank 1" in message0 and "'conv2'" in message0 and "injected" in message0
    assert (kind1, message1) == ("RuntimeError", "injected failure at conv2")
    assert [r["unchanged_after_failure"] for r in ranks] == [True, True]
    assert [r["step_index_after_failure"] for r in ranks] == [0, 0]


def test_ranks_that_disagree_on_the_step_refuse_it(ranks: list[dict[str, Any]]) -> None:
    for result in ranks:
        kind, message = result["disagreement"]
        assert kind == "DistributedError"
        assert "disagree on step 1" in message
        assert "rank 0: step 1 ['conv2']" in message  # checked before any work
        assert "rank 1: step 1 ['conv2', 'conv3']" in message
    assert [r["unchanged_after_disagreement"] for r in ranks] == [True, True]


def test_layers_are_shared_between_ranks(ranks: list[dict[str, Any]]) -> None:
    # The larger layer of each step goes to rank 0, the other to rank 1.
    assert [r["step1_local"] for r in ranks] == [["conv3"], ["conv2"]]
    assert [r["step2_local"] for r in ranks] == [["fc1"], ["fc2"]]
    assert ranks[0]["step1_changes"] == ranks[1]["step1_changes"]
    assert [c["name"] for c in ranks[0]["step1_changes"]] == ["conv2", "conv3"]


def test_ranks_hold_identical_parameters_after_every_step(ranks: list[dict[str, Any]]) -> None:
    for key in ("step1_state", "finetuned_state", "step2_state", "final_state"):
        _assert_equal_states(ranks[0][key], ranks[1][key])
    assert [r["resumed_equal"] for r in ranks] == [True, True]
    # The resumed run ends exactly where the uninterrupted one did.
    _assert_equal_states(ranks[0]["resumed_final_state"], ranks[0]["final_state"])
    _assert_equal_states(ranks[1]["resumed_final_state"], ranks[0]["final_state"])
    assert [r["done"] for r in ranks] == [True, True]


def test_result_equals_a_single_process_run(ranks: list[dict[str, Any]]) -> None:
    data = load_digits_data(0)
    model = _model()
    compressor = _compressor(model)
    step1 = compressor.compression_step()
    _assert_equal_states(_state(model), ranks[0]["step1_state"])
    assert [c.to_dict() for c in step1.changes] == ranks[0]["step1_changes"]

    _finetune_single(model, data)
    _assert_equal_states(_state(model), ranks[0]["finetuned_state"])
    compressor.compression_step()
    _assert_equal_states(_state(model), ranks[0]["step2_state"])
    _finetune_single(model, data)
    _assert_equal_states(_state(model), ranks[0]["final_state"])
    assert sum(isinstance(m, sc.DecomposedLayer) for m in model.modules()) == 4


def test_assignment_balances_cost_deterministically() -> None:
    costs = [5.0, 1.0, 4.0, 3.0, 2.0]
    owners = assign_layers(costs, 2)
    assert owners == [0, 0, 1, 1, 0]
    loads = [sum(c for c, o in zip(costs, owners, strict=True) if o == r) for r in range(2)]
    assert loads == [8.0, 7.0]
    assert assign_layers(costs, 1) == [0] * 5
    assert assign_layers(costs, 8) == [0, 4, 1, 2, 3]
    with pytest.raises(sc.StagecompError, match="world_size=0"):
        assign_layers(costs, 0)


def test_layer_cost_is_the_svd_of_the_unfolding() -> None:
    conv = LayerShape.from_module(nn.Conv2d(32, 64, 3))
    assert layer_cost(conv) == 64 * 288 * 64
    linear = LayerShape.from_module(nn.Linear(512, 10))
    assert layer_cost(linear) == 10 * 512 * 10


def test_distributed_true_needs_a_process_group() -> None:
    assert use_distributed(None) is False
    assert use_distributed(False) is False
    with pytest.raises(sc.StagecompError, match="distributed=True needs an initialised"):
        sc.Compressor(_model(), "reduction", distributed=True, progress=False)


def test_digest_sees_one_ulp() -> None:
    model = _model()
    before = parameters_digest(model)
    with torch.no_grad():
        model.fc2.bias[0] = torch.nextafter(model.fc2.bias[0], torch.tensor(1.0))
    after = parameters_digest(model)
    assert [k for k in before if before[k] != after[k]] == ["fc2.bias"]


def test_fsdp_gather_compress_reshard_keeps_ranks_identical(ranks: list[dict[str, Any]]) -> None:
    assert [r["fsdp_local_rows"] for r in ranks] == [64, 64]  # fc1's 128 rows, sharded
    assert [r["fsdp_resharded_equal"] for r in ranks] == [[True, True], [True, True]]
    assert [r["fsdp_decomposed"] for r in ranks] == [4, 4]
    _assert_equal_states(ranks[0]["fsdp_state"], ranks[1]["fsdp_state"])


def test_a_layer_twice_in_one_step_equals_a_single_process(ranks: list[dict[str, Any]]) -> None:
    model = _model()
    changes = [c.to_dict() for c in _two_stages_in_one_step(model).compression_step().changes]
    assert [c["name"] for c in changes] == ["conv2", "conv3", "fc1", "fc2"] * 2
    assert all(c["skipped"] is None for c in changes)
    assert [c["stage"] for c in changes] == [0] * 4 + [1] * 4
    for result in ranks:
        assert result["two_stages_changes"] == changes
        _assert_equal_states(result["two_stages_state"], _state(model))


def test_data_aware_steps_agree_across_ranks_and_with_one_process(
    ranks: list[dict[str, Any]],
) -> None:
    _assert_equal_states(ranks[0]["data_aware_state"], ranks[1]["data_aware_state"])
    model = _model()
    aware = _data_aware(model, load_digits_data(0))
    while not aware.done:
        aware.compression_step()
    single = _state(model)
    assert single.keys() == ranks[0]["data_aware_state"].keys()
    for key, value in single.items():
        # Calibration sums in float64 on each rank; one process may use more threads.
        torch.testing.assert_close(ranks[0]["data_aware_state"][key], value, rtol=1e-5, atol=1e-6)
    assert sum(isinstance(m, sc.DecomposedLayer) for m in model.modules()) == 4
