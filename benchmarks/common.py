"""Helpers shared by the benchmark modules: paths, data, machine info, timing, paired statistics, figures and
Markdown templates.

The data conventions (``$L2O_SHARED_DATA`` or ``<repo>/../shared/data``, batches as in ``data/batch.py``) are
those of docs/design.md §8.
"""

from __future__ import annotations

import functools
import math
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from string import Template
from typing import Any

import torch
from torch.utils.data import Dataset

from data.datamodule import RegistrationDataModule

#: the repository root and the folder of the result pages
REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


# ---------------------------------------------------------------------------------------------------- data


def shared_data_root(name: str | None = None) -> Path:
    """The folder of the shared data sets: ``$L2O_SHARED_DATA``; else ``<repo>/.gpu_data`` when it holds the data
    set ``name`` (the copy a device run stages); else ``<repo>/../shared/data``. The data may be absent."""
    env = os.environ.get("L2O_SHARED_DATA")
    if env:
        return Path(env)
    staged = REPO / ".gpu_data"
    if name is not None and (staged / name / f"{name}_dataset.json").is_file():
        return staged
    return REPO.parent / "shared" / "data"


def dataset_json(name: str) -> Path:
    """The Learn2Reg dataset JSON of the shared data set ``name`` (e.g. ``Hippocampus``); it may not exist."""
    return shared_data_root(name) / name / f"{name}_dataset.json"


def as_batch(sample: dict[str, Any]) -> dict[str, Any]:
    """A one-pair batch (``data/batch.py``) from a sample: tensors gain a batch dimension, strings a list."""
    return {k: (v[None] if torch.is_tensor(v) else [v]) for k, v in sample.items()}


class CachedDataModule(RegistrationDataModule):
    """:class:`RegistrationDataModule` whose synthetic splits are generated once and kept in memory."""

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        super().setup(stage)
        self.datasets = {k: None if v is None else _Cached(v) for k, v in self.datasets.items()}


# ------------------------------------------------------------------------------------------ machine info


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` knows."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return cpu


def machine() -> str:
    """CPU model, logical cores and operating system in one phrase."""
    return f"{cpu_model()}, {os.cpu_count()} logical cores, {platform.system()} {platform.release()}"


def torch_threads(threads: int) -> str:
    """``torch <version>, <threads> threads``."""
    return f"torch {torch.__version__}, {threads} threads"


def load_average() -> str:
    """The 1 / 5 / 15 min load averages, ``1.2 / 1.1 / 1.0``."""
    load = os.getloadavg()
    return f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}"


def now(seconds: bool = True) -> str:
    """The local time, ``YYYY-MM-DD HH:MM[:SS]``."""
    return time.strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M")


# ------------------------------------------------------------------------------------------------ timing


def paired_medians(fns: Sequence[Callable[[], Any]], repeats: int) -> list[float]:
    """Median seconds of each function over ``repeats`` runs after one warm-up each, the functions run
    alternately (so drifts of a shared machine hit all alike)."""
    for fn in fns:
        fn()  # warm-up
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


# ------------------------------------------------------------------------------------------- statistics


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Mean of the per-pair differences ``a − b``, its standard error, the fractions of pairs where ``a < b``
    (``wins``) and ``a = b`` (``ties``): a paired comparison of two methods on the same pairs. Pairs where
    either value is NaN are left out (``pairs`` counts the rest), as NaN-ignoring means leave them out."""
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    d = d[~torch.isnan(d)]
    return {"mean": float(d.mean()), "se": float(d.std() / math.sqrt(d.numel())),
            "wins": float((d < 0).double().mean()), "ties": float((d == 0).double().mean()),
            "pairs": int(d.numel())}


# ---------------------------------------------------------------------------------------- pages, figures


def write_page(path: Path, lines: list[str]) -> Path:
    """Write the Markdown ``lines`` (joined by newlines) to ``path``, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


def pyplot() -> Any:
    """:mod:`matplotlib.pyplot` on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, dpi: int) -> None:
    """Lay out, save and close a matplotlib figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def render(template: Path, block: str, /, **values: Any) -> list[str]:
    """The lines of one block of a Markdown template file with its ``$placeholders`` substituted
    (:class:`string.Template`; ``$$`` is a literal dollar). A file holds blocks, each after a line
    ``<!-- block: NAME -->``, up to the next such line with one newline dropped (a block ending in an empty line
    ends in two); the text before the first block is a comment on the file."""
    return Template(_blocks(template)[block]).substitute(values).split("\n")


# ------------------------------------------------------------------------------------------------ helpers


class _Cached(Dataset):
    """Materialise a (slow, deterministic) synthetic dataset once."""

    def __init__(self, ds: Dataset) -> None:
        self.items = [ds[i] for i in range(len(ds))]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


_BLOCK = re.compile(r"^<!-- block: (\w+) -->\n", flags=re.MULTILINE)


@functools.cache
def _blocks(template: Path) -> dict[str, str]:
    parts = _BLOCK.split(template.read_text())
    return {parts[i]: parts[i + 1].removesuffix("\n") for i in range(1, len(parts), 2)}
