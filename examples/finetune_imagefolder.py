"""Compress an image classifier in stages with fine-tuning between steps, on your own data.

For users who have CIFAR-10 or an ImageNet-style folder on disk (nothing is
downloaded):

* CIFAR-10: the folder that holds ``cifar-10-batches-py/`` (the python version);
* an image folder: ``DATA/train/<class>/*.jpg`` and ``DATA/val/<class>/*.jpg``
  (torchvision ``ImageFolder`` layout, e.g. ImageNet or Imagenette).

The model is a torchvision classifier, randomly initialised or loaded from
``--weights`` (a state dict; fine-tune it on the data first with
``--pretrain-epochs`` if it is not trained yet). After every compression step
the model is fine-tuned with a fresh SGD optimizer (the step replaced some
parameters), evaluated, and checkpointed: the Compressor's state as JSON plus
the model with ``stagecomp.save``, so ``--resume`` continues an interrupted run.

Run:
    python examples/finetune_imagefolder.py ~/data/cifar10 --dataset cifar10 \\
        --model resnet18 --weights resnet18_cifar.pt --num-classes 10 --strategy vbmf \\
        --stages 2 --layers-per-step 4 --epochs-per-step 1 --out runs/r18
    python examples/finetune_imagefolder.py ~/data/imagenette2 --model resnet50 \\
        --weights resnet50.pt --strategy reduction --rate 2 --out runs/r50
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision
from safetensors.torch import load_model
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

import stagecomp as sc
from stagecomp.zoo import load_weights_file

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def resolve_kind(root: Path, kind: str) -> str:
    """``cifar10`` or ``imagefolder``; a clear error when the folder is not there."""
    if not root.exists():
        raise SystemExit(f"error: data folder {root} does not exist (nothing is downloaded)")
    if kind == "auto":
        return "cifar10" if (root / "cifar-10-batches-py").is_dir() else "imagefolder"
    return kind


def datasets(root: Path, kind: str, size: int) -> tuple[Dataset[Any], Dataset[Any], int]:
    """Train and validation sets and the number of classes."""
    normalize = transforms.Normalize(MEAN, STD)
    if kind == "cifar10":
        resize = [transforms.Resize(size)] if size != 32 else []
        augment = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
        train_tf = transforms.Compose([*augment, *resize, transforms.ToTensor(), normalize])
        val_tf = transforms.Compose([*resize, transforms.ToTensor(), normalize])
        try:
            train = torchvision.datasets.CIFAR10(str(root), True, train_tf, download=False)
            val = torchvision.datasets.CIFAR10(str(root), False, val_tf, download=False)
        except RuntimeError:
            raise SystemExit(
                f"error: no CIFAR-10 (python version) under {root}: expected "
                f"{root / 'cifar-10-batches-py'} with data_batch_1..5 and test_batch"
            ) from None
        return train, val, 10
    missing = [p for p in (root / "train", root / "val") if not p.is_dir()]
    if missing:
        raise SystemExit(
            f"error: {', '.join(map(str, missing))} not found; an image folder needs "
            "train/<class>/... and val/<class>/... (or pass --dataset cifar10)"
        )
    train_tf = transforms.Compose(
        [
            transforms.RandomResizedCrop(size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalize,
        ]
    )
    val_tf = transforms.Compose(
        [
            transforms.Resize(int(size * 256 / 224)),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            normalize,
        ]
    )
    train_set = torchvision.datasets.ImageFolder(str(root / "train"), train_tf)
    val_set = torchvision.datasets.ImageFolder(str(root / "val"), val_tf)
    return train_set, val_set, len(train_set.classes)


def train_epochs(
    model: nn.Module,
    loader: DataLoader[Any],
    epochs: int,
    lr: float,
    device: torch.device,
) -> None:
    """SGD with momentum and a cosine decay; a fresh optimizer on every call."""
    if epochs <= 0:
        return
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * len(loader))
    model.train()
    for _ in range(epochs):
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(images), labels).backward()
            optimizer.step()
            schedule.step()
    model.eval()


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader[Any], device: torch.device) -> float:
    model.eval()
    correct = total = 0
    for images, labels in loader:
        predictions = model(images.to(device)).argmax(1).cpu()
        correct += int((predictions == labels).sum())
        total += len(labels)
    return correct / max(total, 1)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="CIFAR-10 (cifar-10-batches-py) or an ImageFolder with train/ and val/.",
    )
    parser.add_argument("data", type=Path, help="CIFAR-10 root or an ImageFolder root")
    parser.add_argument("--dataset", choices=["auto", "cifar10", "imagefolder"], default="auto")
    parser.add_argument("--model", default="resnet18", help="torchvision classifier name")
    parser.add_argument("--weights", help="state dict to start from (.safetensors or .pt)")
    parser.add_argument("--image-size", type=int, default=None, help="32 for CIFAR, else 224")
    parser.add_argument("--strategy", choices=["vbmf", "reduction"], default="vbmf")
    parser.add_argument("--rate", type=float, default=2.0, help="reduction: per-layer rate")
    parser.add_argument("--weakening", type=float, default=0.6, help="vbmf: 0 (none) .. 1")
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--layers-per-step", type=int, default=4)
    parser.add_argument("--exclude", nargs="*", default=[], help="layer names or patterns")
    parser.add_argument("--pretrain-epochs", type=int, default=0, help="train before compressing")
    parser.add_argument("--epochs-per-step", type=int, default=1, help="fine-tuning per step")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("stagecomp_run"))
    parser.add_argument(
        "--resume", action="store_true", help="continue the run saved in --out (its settings)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    device = torch.device(args.device)
    kind = resolve_kind(args.data, args.dataset)
    size = args.image_size or (32 if kind == "cifar10" else 224)
    train_set, val_set, classes = datasets(args.data, kind, size)
    loader = DataLoader(
        train_set, args.batch_size, shuffle=True, num_workers=args.workers, drop_last=True
    )
    val_loader = DataLoader(val_set, args.batch_size, num_workers=args.workers)

    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, weights=None, num_classes=classes)
    if args.weights:
        model.load_state_dict(load_weights_file(args.weights))
    model.to(device).eval()
    example = torch.randn(1, 3, size, size, device=device)
    strategy = (
        sc.VBMF(weakening=args.weakening)
        if args.strategy == "vbmf"
        else sc.Reduction(rate=args.rate)
    )
    state_file = args.out / "compressor.json"
    history: list[dict[str, Any]] = []
    if args.resume:
        # The saved state holds the run's settings: rebuild its Compressor on the fresh
        # model (this replays the finished steps' structure), then load the weights.
        state = json.loads(state_file.read_text())
        compressor = sc.Compressor.from_state(model, state, example_input=example)
        load_model(model, str(args.out / "stagecomp.safetensors"), device=str(device))
        history = json.loads((args.out / "history.json").read_text())
        print(f"resumed after step {compressor.step_index} of {compressor.total_steps}")
    else:
        compressor = sc.Compressor(
            model,
            strategy,
            example,
            exclude=args.exclude,
            stages=args.stages,
            layers_per_step=args.layers_per_step,
        )
        train_epochs(model, loader, args.pretrain_epochs, args.lr, device)
        history.append({"step": 0, "accuracy": evaluate(model, val_loader, device)})
        print(f"before compression: accuracy {history[0]['accuracy']:.2%}")

    while not compressor.done:
        started = time.perf_counter()
        result = compressor.compression_step()
        train_epochs(model, loader, args.epochs_per_step, args.lr, device)
        acc = evaluate(model, val_loader, device)
        history.append(
            {
                "step": result.step,
                "accuracy": acc,
                "params": result.params_after,
                "macs": result.macs_after,
                "seconds": time.perf_counter() - started,
            }
        )
        print(
            f"step {result.step}/{compressor.total_steps}: accuracy {acc:.2%}, params "
            f"{result.params_after / 1e6:.2f}M, MACs {(result.macs_after or 0) / 1e9:.3f}G",
            flush=True,
        )
        sc.save(model, args.out)
        state_file.write_text(json.dumps(compressor.state_dict()))
        (args.out / "history.json").write_text(json.dumps(history, indent=1))
    print(compressor.report())
    (args.out / "report.txt").write_text(compressor.report() + "\n")
    return {"history": history, "out": str(args.out)}


if __name__ == "__main__":
    main()
