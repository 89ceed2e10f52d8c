"""Every Python block of README.md and docs/**/*.md runs, so the docs cannot drift from the code.

The blocks of one page run in order in one namespace (a later block uses what an earlier
one made), in a fresh temporary folder. Each page starts with the names its prose treats
as the reader's own: ``model`` (a thin resnet18 with resnet18's layer names and weights
that look trained), ``x``/``example_input``, ``batches``, ``train_loader``, ``finetune``,
``make_optimizer`` and ``build_model()``, so that nearly every block runs as printed.

Markers, in an HTML comment on the line before a block's fence (invisible once rendered):

- ``<!-- docs-test: skip (why) -->``: the block cannot run here (a process group, a GPU,
  a download); it is still compiled, so it stays valid Python.
- ``<!-- docs-test: slow -->``: the block takes more than a few seconds; its page then
  runs only with ``-m slow``.

A hidden block, ``<!-- docs-test: setup`` then code then ``-->``, runs in its place and
gives the next blocks what they assume (e.g. a compressed model) without showing it.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

import stagecomp as sc

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

_MARKER = re.compile(r"<!--\s*docs-test:\s*(?P<kind>skip|slow)\s*(?:\((?P<why>[^)]*)\))?\s*-->")
_SETUP = re.compile(r"<!--\s*docs-test:\s*setup\s*$")
_ANY_MARKER = re.compile(r"docs-test")


@dataclass(frozen=True)
class Block:
    """One Python block of a page: visible (``python``) or hidden (``setup``)."""

    page: Path
    line: int  # 1-based line of the first code line
    code: str
    kind: str = "python"  # "python" or "setup"
    skip: str | None = None  # the reason, for a block that cannot run here
    slow: bool = False

    @property
    def where(self) -> str:
        page = self.page.relative_to(ROOT) if self.page.is_relative_to(ROOT) else self.page.name
        return f"{page}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The page's Python blocks in order, with their markers.

    Raises:
        ValueError: a marker is malformed, a skip gives no reason, or a marker is not
            followed by a Python block (so a typo never disables a block silently).
    """
    lines = page.read_text().splitlines()
    found: list[Block] = []
    pending: tuple[str, str | None, int] | None = None  # (kind, reason, line) of a marker
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if _SETUP.match(stripped):
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "-->")
            code = "\n".join(lines[i + 1 : end])
            found.append(Block(page, i + 2, code, kind="setup"))
            i = end + 1
            continue
        if _ANY_MARKER.search(line) and stripped.startswith("<!--"):
            match = _MARKER.fullmatch(stripped)
            if match is None:
                raise ValueError(f"{page.name}:{i + 1}: malformed docs-test marker {stripped!r}")
            if match["kind"] == "skip" and not (match["why"] or "").strip():
                raise ValueError(f"{page.name}:{i + 1}: a skip needs a reason: skip (why)")
            pending = (match["kind"], match["why"], i + 1)
            i += 1
            continue
        if stripped.startswith("```"):
            language = stripped[3:].strip()
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            if language == "python":
                kind, why, _ = pending or ("", None, 0)
                code = "\n".join(lines[i + 1 : end])
                skip = why if kind == "skip" else None
                found.append(Block(page, i + 2, code, skip=skip, slow=kind == "slow"))
            elif pending is not None:
                raise ValueError(f"{page.name}:{pending[2]}: marker before a {language!r} block")
            pending = None
            i = end + 1
            continue
        if stripped and pending is not None:
            raise ValueError(f"{page.name}:{pending[2]}: marker not followed by a python block")
        i += 1
    return found


# ---------------------------------------------------------------------------- the reader's names
class ThinResNet(nn.Module):
    """resnet18's layout and layer names (``conv1``, ``layer1.0.conv1`` ... ``layer4.1.conv2``,
    ``layer2.0.downsample.0``, ``fc``) at an eighth to a quarter of its widths."""

    def __init__(self, widths: tuple[int, ...] = (32, 32, 64, 128), classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        inplanes = widths[0]
        for index, planes in enumerate(widths):
            stride = 1 if index == 0 else 2
            down = None
            if stride != 1 or inplanes != planes:
                down = nn.Sequential(
                    nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
                )
            blocks = nn.Sequential(
                BasicBlock(inplanes, planes, stride, down), BasicBlock(planes, planes)
            )
            setattr(self, f"layer{index + 1}", blocks)
            inplanes = planes
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for index in range(1, 5):
            x = getattr(self, f"layer{index}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_model() -> nn.Module:
    """The reader's trained model: weights of a quarter rank plus 10% noise, as trained
    weights look to VBMF (random ones are all noise, and VBMF rightly keeps them)."""
    model = ThinResNet()
    g = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            w = module.weight.detach()
            rows, cols = w.shape[0], w[0].numel()
            r = max(1, min(rows, cols) // 4)
            low = torch.randn(rows, r, generator=g) @ torch.randn(r, cols, generator=g)
            low *= w.norm() / low.norm()
            noise = torch.randn(rows, cols, generator=g) * (0.1 * w.norm() / (rows * cols) ** 0.5)
            with torch.no_grad():
                module.weight.copy_((low + noise).reshape(w.shape))
    return model


def finetune(model: nn.Module, optimizer: Any = None, *args: Any, **kwargs: Any) -> None:
    """One real training step on random data (the reader's loop, at its smallest)."""
    inner = getattr(model, "module", model)
    optimizer = optimizer or torch.optim.SGD(inner.parameters(), lr=1e-3)
    model.train()
    inputs = torch.randn(2, 3, 16, 16)
    loss = nn.functional.cross_entropy(model(inputs), torch.randint(0, 10, (2,)))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    model.eval()


def namespace() -> dict[str, Any]:
    """The names a page starts with (a fresh model and data for every page)."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 16, 16)
    generator = torch.Generator().manual_seed(1)
    images = [torch.randn(4, 3, 16, 16, generator=generator) for _ in range(4)]
    labels = [torch.randint(0, 10, (4,), generator=generator) for _ in images]
    model = build_model().eval()

    def make_optimizer(params: Any) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9)

    return {
        "sc": sc,
        "torch": torch,
        "nn": nn,
        "model": model,
        "x": x,
        "example_input": x,
        "batches": images,
        "train_loader": list(zip(images, labels, strict=True)),
        "build_model": build_model,
        "finetune": finetune,
        "make_optimizer": make_optimizer,
    }


# ---------------------------------------------------------------------------- the tests
def _page_params() -> Iterator[Any]:
    for page in PAGES:
        found = blocks(page)
        if not any(b.kind == "python" for b in found):
            continue
        marks = [pytest.mark.slow] if any(b.slow for b in found) else []
        yield pytest.param(page, id=str(page.relative_to(ROOT)), marks=marks)


def run_page(page: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the page's blocks in order in one namespace; every block is compiled, the
    skipped ones are not run. A failing block raises ``AssertionError`` with its line."""
    # The page runs as a module of its own, as a reader's script would (dataclasses and
    # pickling look their module up in sys.modules).
    module = ModuleType("docs_page")
    module.__dict__.update(namespace())
    monkeypatch.setitem(sys.modules, module.__name__, module)
    for block in blocks(page):
        # Padded so that a traceback gives the block's line numbers in the page; compiled
        # without this file's ``from __future__`` flags, as the reader's code would be.
        source = "\n" * (block.line - 1) + block.code
        compiled = compile(source, str(page), "exec", dont_inherit=True)
        if block.skip is not None:
            continue
        try:
            exec(compiled, module.__dict__)
        except Exception as error:
            raise AssertionError(f"{block.where}: the block fails: {error!r}") from error


@pytest.mark.parametrize("page", list(_page_params()))
def test_page_blocks_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    run_page(page, monkeypatch)


def test_a_failing_block_fails_with_its_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "```python\nsteps = 2\n```\n<!-- docs-test: skip (no GPU here) -->\n"
        "```python\ntorch.cuda.init()\n```\n```python\nrate = steps / 0\n```\n"
    )
    with pytest.raises(AssertionError, match=r"page\.md:9: the block fails: ZeroDivisionError"):
        run_page(page, monkeypatch)
    page.write_text("<!-- docs-test: skip (never run) -->\n```python\nif True\n```\n")
    with pytest.raises(SyntaxError):
        run_page(page, monkeypatch)


def test_markers_are_few_and_give_reasons() -> None:
    every = [b for page in PAGES for b in blocks(page) if b.kind == "python"]
    skipped = [b for b in every if b.skip is not None]
    assert len(every) >= 30  # the parser finds the blocks
    assert len(skipped) <= len(every) // 5, [f"{b.where}: {b.skip}" for b in skipped]


def test_the_parser_reads_markers_setup_and_rejects_typos(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "text\n<!-- docs-test: setup\na = 1\n-->\n\n```python\nb = a + 1\n```\n"
        "<!-- docs-test: skip (needs a GPU) -->\n```python\ntorch.cuda.init()\n```\n"
        "```bash\necho hi\n```\n<!-- docs-test: slow -->\n```python\nc = b\n```\n"
    )
    found = blocks(page)
    assert [(b.kind, b.code, b.skip, b.slow, b.line) for b in found] == [
        ("setup", "a = 1", None, False, 3),
        ("python", "b = a + 1", None, False, 7),
        ("python", "torch.cuda.init()", "needs a GPU", False, 11),
        ("python", "c = b", None, True, 18),
    ]
    for bad in (
        "<!-- docs-test: skpi (x) -->\n```python\na\n```\n",
        "<!-- docs-test: skip -->\n```python\na\n```\n",
        "<!-- docs-test: skip (x) -->\ntext\n```python\na\n```\n",
        "<!-- docs-test: skip (x) -->\n```bash\na\n```\n",
    ):
        page.write_text(bad)
        with pytest.raises(ValueError, match=r"page\.md:1"):
            blocks(page)
