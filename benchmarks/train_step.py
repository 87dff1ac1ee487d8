"""Time and memory of one LearnGN 3D training step on a BrainPair volume, with a profile by stage.

    python -m benchmarks.train_step --device cuda --out benchmarks/results/train_step_gpu.md
    python -m benchmarks.train_step --device cpu --size 80 96 112 --repeats 1 --out benchmarks/results/train_step_cpu.md

The model: ``LearnGN(spatial_dims=3, features="mind", iterations=10, stride=4, hidden=h, label_loss="dice",
w_label=1, w_reg=1)`` with ``label_ids`` the non-zero labels present in the pair, per ``--hidden`` value and per
``--variants`` entry (``base``: as configured by default; ``recompute``: ``LearnGN(recompute=True)``, the
full-resolution part of each GN iteration recomputed in the backward pass, docs/design.md §3). One training
step = ``model.register(batch)``, ``loss = sum(model.loss_terms(batch, u).values())``, ``loss.backward()``
(no optimiser step). For each configuration:

* ``step s``: median wall time of ``--repeats`` steps after two warm-up steps (``torch.cuda.synchronize``
  around each on CUDA); ``infer s``: the same for ``register`` under ``torch.no_grad``;
* ``peak GiB``: ``torch.cuda.max_memory_allocated`` over the timed steps after ``reset_peak_memory_stats``
  (``+step``: minus the allocation before them, when the model, the batch and nothing else are held); "n/a" on
  the CPU;
* ``saved GiB``: the bytes of the distinct storages saved for backward during one forward
  (``torch.autograd.graph.saved_tensors_hooks``), split by stage (the stage active when the tensor was saved;
  tensors saved inside a recomputed region are not stored and are not counted, nor is what ``layers.gn_solve``
  keeps as attributes of its autograd context, the stride-4 system; "checkpoint inputs" are the padded
  features, which a recomputed region keeps for its backward pass);
* the stage profile: one step under ``torch.profiler`` (``profile_memory``): per range the total time (CUDA
  kernel time on CUDA, CPU time on the CPU), the number of calls and the memory allocated and not freed inside
  it (summed over calls; negative when a range frees more than it allocates). Ranges: ``features`` (MIND of
  both images), ``gn.warp`` (upsampling and warping the moving features), ``gn.jf`` (the J and f heads),
  ``gn.normal_equations`` (H, g), ``gn.solve`` (``layers.gn_solve`` forward), ``loss``, ``backward`` (all
  autograd backward functions, inclusive: a recomputed forward runs inside them, and its ``gn.*`` ranges are
  counted in their rows too, hence twice the calls), and the backward functions with the most time.

Data: the BrainPair pair 0001←0002 (``$L2O_SHARED_DATA``, else ``<repo>/.gpu_data``, else ``<repo>/../shared/data``)
read with :class:`data.learn2reg.Learn2RegDataset` and resampled to ``--size`` when it differs; without it a
synthetic pair of :class:`data.synthetic.SyntheticPairs` of that size. An error (out of memory included) in one
configuration is reported in its row and the script goes on; the report is rewritten after each configuration,
and configurations that would start after ``--budget`` seconds are skipped (reported).
"""

from __future__ import annotations

import os

# OpenMP's default spin-waiting makes CPU timings erratic on a shared, oversubscribed machine (as in
# benchmarks/gn_layer.py): passive waiting is set before torch loads OpenMP, unless the caller chose a policy
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections import defaultdict  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

import layers.gn as gn_module  # noqa: E402
from benchmarks.common import as_batch, dataset_json  # noqa: E402
from lightning_modules.learngn import LearnGN  # noqa: E402

VARIANTS = {"base": {}, "recompute": {"recompute": True}}
STAGES = ("features", "gn.warp", "gn.jf", "gn.normal_equations", "gn.solve", "loss", "backward")
GIB = 2.0**30


def train_step_benchmark(
    device: torch.device, size: tuple[int, int, int], hidden: list[int], variants: list[str], repeats: int,
    out: Path, command: str, budget: float = 90.0,
) -> list[dict[str, Any]]:
    """Measure every (hidden, variant) configuration on one pair; writes ``out`` after each and returns the rows."""
    start = time.perf_counter()
    batch, source = load_pair(size, device)
    ids = present_labels(batch)
    header = report_header(device, size, source, ids, repeats, command)
    rows: list[dict[str, Any]] = []
    for h in hidden:
        for v in variants:
            row: dict[str, Any] = {"hidden": h, "variant": v}
            if time.perf_counter() - start > budget:
                row["error"] = f"skipped: the {budget:.0f} s budget was spent"
            else:
                try:
                    row.update(measure(make_model(h, v, ids, device), batch, device, repeats))
                except Exception as exc:  # noqa: BLE001 - one failing configuration must not end the run
                    row["error"] = describe(exc)
                    traceback.print_exc()
                finally:
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("stages", "backward_top", "saved")}),
                  flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(render(header, rows))
    return rows


# ------------------------------------------------------------------------------------------------ data, model


def load_pair(size: tuple[int, int, int], device: torch.device) -> tuple[dict[str, Any], str]:
    """A one-pair batch of shape ``(1, 1, *size)`` on ``device`` and a description of its source."""
    json_path = dataset_json("BrainPair")
    if json_path.is_file():
        from data.learn2reg import Learn2RegDataset

        ds = Learn2RegDataset(json_path, "registration_val", require_labels=True, cache_size=0)
        sample = ds[0]
        native = tuple(sample["fixed"].shape[1:])
        if native != tuple(size):
            ds = Learn2RegDataset(json_path, "registration_val", require_labels=True, cache_size=0,
                                  target_shape=size)
            sample = ds[0]
        source = (f"BrainPair {sample['fixed_id']}←{sample['moving_id']} ({json_path.parent}), "
                  + ("native grid" if native == tuple(size) else f"resampled from {'×'.join(map(str, native))}"))
    else:
        from data.synthetic import SyntheticPairs

        sample = SyntheticPairs(1, seed=0, shape=size, ndim=3)[0]
        source = "synthetic (data.synthetic.SyntheticPairs, seed 0; BrainPair not found)"
    batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in as_batch(sample).items()}
    return batch, source


def present_labels(batch: dict[str, Any]) -> list[int]:
    """The non-zero labels present in both label maps."""
    fixed = set(torch.unique(batch["fixed_label"]).tolist())
    moving = set(torch.unique(batch["moving_label"]).tolist())
    return sorted(int(v) for v in (fixed & moving) - {0})


def make_model(hidden: int, variant: str, label_ids: list[int], device: torch.device) -> LearnGN:
    model = LearnGN(spatial_dims=3, features="mind", label_ids=label_ids, iterations=10, stride=4, hidden=hidden,
                    label_loss="dice", w_label=1.0, w_reg=1.0, **VARIANTS[variant])
    return model.to(device)


# ------------------------------------------------------------------------------------------------ measurements


def measure(model: LearnGN, batch: dict[str, Any], device: torch.device, repeats: int) -> dict[str, Any]:
    """Step and inference times, peak memory, saved bytes by stage and the profile of one configuration."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step() -> float:
        model.zero_grad(set_to_none=True)
        u = model.register(batch)
        loss = sum(model.loss_terms(batch, u).values())
        loss.backward()
        return float(loss.detach())

    def infer() -> None:
        with torch.no_grad():
            model.register(batch)

    row: dict[str, Any] = {}
    for _ in range(2):
        row["loss"] = step()
    cuda = device.type == "cuda"
    if cuda:  # the peak of the timed steps (the same step each time)
        model.zero_grad(set_to_none=True)
        sync()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    row["step_s"] = median_seconds(step, repeats, sync)
    if cuda:
        row["peak_gib"] = torch.cuda.max_memory_allocated() / GIB
        row["peak_step_gib"] = (torch.cuda.max_memory_allocated() - before) / GIB
    model.zero_grad(set_to_none=True)
    row["infer_s"] = median_seconds(infer, repeats, sync)  # warmed up by the training steps
    try:  # the timings above are kept when an instrumented pass fails
        row["saved"] = saved_bytes_by_stage(model, batch)
        row["stages"], row["backward_top"] = stage_profile(model, batch, device)
    except Exception as exc:  # noqa: BLE001
        row["error"] = f"profile: {describe(exc)}"
        traceback.print_exc()
    return row


def median_seconds(fn: Callable[[], Any], repeats: int, sync: Callable[[], None]) -> float:
    times = []
    for _ in range(max(1, repeats)):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class _StageLabels:
    """The stage active while a tensor is saved for backward: a stack of labels pushed by wrappers around the
    GN layer's stage functions (``layers.gn`` module attributes and the ``jf`` module, restored on exit)."""

    PATCHED = {"upsample_field": "gn.warp", "warp_image": "gn.warp", "handcrafted_jf": "gn.jf",
               "similarity_weight": "gn.normal_equations", "pool_to_grid": "gn.normal_equations",
               "assemble_normal_equations": "gn.normal_equations", "laplacian_apply": "gn.normal_equations",
               "gn_solve": "gn.solve"}

    def __init__(self) -> None:
        self.stack = ["other (updates, final upsampling, checkpoint inputs)"]

    @contextlib.contextmanager
    def label(self, name: str) -> Iterator[None]:
        self.stack.append(name)
        try:
            yield
        finally:
            self.stack.pop()

    def wrap(self, fn: Callable, name: str) -> Callable:
        def wrapped(*args, **kwargs):
            with self.label(name):
                return fn(*args, **kwargs)
        return wrapped

    @contextlib.contextmanager
    def patched(self, model: LearnGN) -> Iterator[None]:
        saved = {name: getattr(gn_module, name) for name in self.PATCHED}
        jf = model.gn.jf
        def push(*_) -> None:
            self.stack.append("gn.jf")

        def pop(*_) -> None:  # a forward hook returning a value would replace the output
            self.stack.pop()

        hooks = [jf.register_forward_pre_hook(push), jf.register_forward_hook(pop)] if jf is not None else []
        features = model.features
        try:
            for name, stage in self.PATCHED.items():
                setattr(gn_module, name, self.wrap(saved[name], stage))
            model.features = self.wrap(features, "features")
            yield
        finally:
            for name, fn in saved.items():
                setattr(gn_module, name, fn)
            del model.features
            for hook in hooks:
                hook.remove()


def saved_bytes_by_stage(model: LearnGN, batch: dict[str, Any]) -> dict[str, float]:
    """GiB of the distinct storages saved for backward by one training forward (model and loss), per stage."""
    labels = _StageLabels()
    seen: dict[int, tuple[str, int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        seen.setdefault(s.data_ptr(), (labels.stack[-1], s.nbytes()))
        return t

    model.zero_grad(set_to_none=True)
    with labels.patched(model), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        u = model.register(batch)
        with labels.label("loss"):
            loss = sum(model.loss_terms(batch, u).values())
    del loss, u
    totals: dict[str, float] = defaultdict(float)
    for stage, nbytes in seen.values():
        totals[stage] += nbytes / GIB
    return dict(totals)


def stage_profile(model: LearnGN, batch: dict[str, Any], device: torch.device
                  ) -> tuple[dict[str, dict[str, float]], list[tuple[str, float, int]]]:
    """Per stage: ms (CUDA kernel time on CUDA, CPU time otherwise), calls and MiB allocated and kept; and the
    eight backward functions with the most time ``(name, ms, calls)``."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    features = model.features

    def labelled_features(*args, **kwargs):
        with record_function("features"):
            return features(*args, **kwargs)

    def profiled_step() -> None:
        model.zero_grad(set_to_none=True)
        u = model.register(batch)
        with record_function("loss"):
            loss = sum(model.loss_terms(batch, u).values())
        loss.backward()

    model.features = labelled_features
    try:
        with profile(activities=activities, profile_memory=True) as prof:
            profiled_step()
            if cuda:
                torch.cuda.synchronize()
    finally:
        del model.features

    def ms(evt) -> float:
        if cuda:
            return getattr(evt, "device_time_total", getattr(evt, "cuda_time_total", 0.0)) / 1e3
        return evt.cpu_time_total / 1e3

    def mib(evt) -> float:
        value = (getattr(evt, "device_memory_usage", getattr(evt, "cuda_memory_usage", 0)) if cuda
                 else evt.cpu_memory_usage)
        return value / 2**20

    stages: dict[str, dict[str, float]] = {}
    backward = {"ms": 0.0, "calls": 0, "mib": 0.0}
    top = []
    prefix = "autograd::engine::evaluate_function: "
    for evt in prof.key_averages():
        if evt.key in STAGES:
            stages[evt.key] = {"ms": ms(evt), "calls": evt.count, "mib": mib(evt)}
        elif evt.key.startswith(prefix):
            backward["ms"] += ms(evt)
            backward["calls"] += evt.count
            backward["mib"] += mib(evt)
            top.append((evt.key[len(prefix):], ms(evt), evt.count))
    stages["backward"] = backward
    top.sort(key=lambda t: -t[1])
    return stages, top[:8]


# ------------------------------------------------------------------------------------------------ report


def report_header(device: torch.device, size: tuple[int, int, int], source: str, ids: list[int], repeats: int,
                  command: str) -> list[str]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"{os.cpu_count()} logical cores, load average {os.getloadavg()[0]:.1f}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')})")
    return [
        "# LearnGN 3D training step: time, memory and where they go",
        "",
        "Written by `benchmarks/train_step.py`; do not edit by hand.",
        "",
        f"Command: `{command}`",
        "",
        f"- device: {name}",
        f"- torch {torch.__version__}" + (f" (CUDA {torch.version.cuda})" if device.type == "cuda" else ""),
        f"- date: {time.strftime('%Y-%m-%d %H:%M')}",
        f"- data: {source}, size {'×'.join(map(str, size))}, {len(ids)} labels (those present in both maps)",
        "- model: LearnGN 3D, MIND features (12 channels), 10 GN iterations, stride 4, linear heads (+ a "
        "nonlinear branch of width `hidden`), label loss dice (w 1) + diffusion regulariser (w 1); CG rtol 1e-3, "
        "solver backend `auto`",
        f"- timings: median of {repeats} after 2 warm-up steps (inference: median of {repeats} after those); one "
        "step = register + loss + backward (no optimiser step); the stage profile from one more step (under the "
        "profiler, slower), the saved bytes from one more forward",
        "",
    ]


def render(header: list[str], rows: list[dict[str, Any]]) -> str:
    lines = list(header)
    lines += ["## Configurations", "",
              "| hidden | variant | step s | infer s | peak GiB (+step) | saved for backward GiB | loss | error |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = (f"{r['peak_gib']:.2f} (+{r['peak_step_gib']:.2f})" if "peak_gib" in r else "n/a")
        saved = f"{sum(r['saved'].values()):.3f}" if "saved" in r else ""
        lines.append(f"| {r['hidden']} | {r['variant']} | {_fmt(r.get('step_s'), '.3f')} | "
                     f"{_fmt(r.get('infer_s'), '.3f')} | {peak if 'step_s' in r else ''} | {saved} | "
                     f"{_fmt(r.get('loss'), '.5f')} | {r.get('error', '')} |")
    lines.append("")
    for r in rows:
        if "stages" not in r:
            continue
        lines += [f"## Stages: hidden {r['hidden']}, {r['variant']}", "",
                  "| stage | ms | calls | memory kept MiB | saved for backward GiB |", "|---|---|---|---|---|"]
        saved = dict(r["saved"])
        for name in STAGES:
            s = r["stages"].get(name)
            if s is None:
                continue
            lines.append(f"| {name} | {s['ms']:.1f} | {s['calls']} | {s['mib']:.0f} | "
                         f"{_fmt(saved.pop(name, None), '.3f')} |")
        for name, value in saved.items():
            lines.append(f"| {name} | | | | {value:.3f} |")
        lines += ["", "Backward functions with the most time: "
                  + ", ".join(f"{n} {t:.1f} ms ({c}×)" for n, t, c in r["backward_top"]), ""]
    return "\n".join(lines)


def describe(exc: BaseException) -> str:
    """``"Type: first line of the message"`` (at most 200 characters of it)."""
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=None, help="Markdown report (default "
                   "benchmarks/results/train_step_<device>.md)")
    p.add_argument("--size", type=int, nargs=3, default=(160, 192, 224), metavar=("D", "H", "W"))
    p.add_argument("--hidden", type=int, nargs="+", default=[0, 8])
    p.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=["base", "recompute"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--budget", type=float, default=90.0,
                   help="seconds after which no further configuration starts")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    out = a.out or REPO / "benchmarks" / "results" / f"train_step_{device.type}.md"
    command = "python -m benchmarks.train_step " + shlex.join(argv if argv is not None else sys.argv[1:])
    train_step_benchmark(device, tuple(a.size), a.hidden, a.variants, a.repeats, out, command, a.budget)


if __name__ == "__main__":
    main()
