"""Wall time of one compression step shared among 1, 2, ... processes.

Every layer of a torchvision model (weights=None, 2x parameter reduction) is
decomposed in one step. With N processes each decomposes its share of the
layers and the factors are broadcast (``Compressor(distributed=None)`` picks
this up from the process group). Each process count runs in fresh processes on
loopback (gloo on CPU; nccl on CUDA when there is one GPU per process, else
gloo with CUDA tensors). The script checks that all ranks hold the same model
and that it is the model the first process count computed. Besides the wall
time it prints the CPU time of the busiest rank, which shows how the work is
split even when other programs share the machine.

Run: ``python benchmarks/bench_distributed.py --model resnet50 --threads 1 --procs 1 2``
(add ``--device cuda`` on a GPU machine).
"""

from __future__ import annotations

import argparse
import json
import socket
import tempfile
import time
from datetime import timedelta
from pathlib import Path

GROUP_TIMEOUT = timedelta(minutes=10)


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    import torch
    import torch.distributed as dist
    import torchvision

    import stagecomp as sc
    from stagecomp.distributed import assert_same_parameters, parameters_digest

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    backend = "gloo"
    if device.type == "cuda":
        if torch.cuda.device_count() >= world:
            device = torch.device("cuda", rank)
            backend = "nccl"
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=GROUP_TIMEOUT,
    )
    try:
        torch.manual_seed(0)
        model = torchvision.models.get_model(args.model, weights=None).eval().to(device)
        c = sc.Compressor(model, sc.Reduction(2.0), layers_per_step=10_000, progress=False)
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        result = c.compression_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        seconds = time.perf_counter() - start
        cpu: list[object] = [None] * world
        dist.all_gather_object(cpu, time.process_time() - cpu_start)
        assert_same_parameters(model)
        if rank == 0:
            summary = {
                "seconds": seconds,
                "max_rank_cpu": max(float(c) for c in cpu),  # type: ignore[arg-type]
                "layers": len(result.changes),
                "backend": backend,
                "params_x": result.params_before / result.params_after,
                "digest": parameters_digest(model),
            }
            Path(out).write_text(json.dumps(summary))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run(world: int, args: argparse.Namespace) -> dict[str, object]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        out = str(Path(folder) / "result.json")
        mp.start_processes(
            _rank,
            args=(world, _free_port(), args, out),
            nprocs=world,
            join=True,
            start_method="spawn",
        )
        return dict(json.loads(Path(out).read_text()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    print(f"{args.model}, all layers in one step, Reduction(2.0), {args.threads} thread(s)/proc")
    print(
        "| procs | backend | layers | step s | x vs first | busiest rank CPU s "
        "| params x | same model as first |"
    )
    print("|---|---|---|---|---|---|---|---|")
    first: dict[str, object] | None = None
    for world in args.procs:
        row = _run(world, args)
        first = first or row
        speedup = float(first["seconds"]) / float(row["seconds"])  # type: ignore[arg-type]
        same = "yes" if row["digest"] == first["digest"] else "NO"
        print(
            f"| {world} | {row['backend']} | {row['layers']} | {row['seconds']:.2f} | "
            f"{speedup:.2f} | {row['max_rank_cpu']:.2f} | {row['params_x']:.2f} | {same} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
