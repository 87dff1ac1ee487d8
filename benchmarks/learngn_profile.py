"""Where the time of one LearnGN registration goes (a Hippocampus val pair, the shipped model).

    python -m benchmarks.learngn_profile [--ckpt checkpoints/hippocampus_learngn.ckpt] [--threads 2]
        [--repeats 5] [--json OUT.json] [--before EARLIER.json] [--second-ckpt OTHER.ckpt]

Times ``register`` (median of ``--repeats`` after a warm-up, the parts run alternately), the features alone
(MIND-SSC + the semantic U-Net on both images), the U-Net on both images (``LearnGN.semantic_maps``), the same
U-Net with PyTorch's instance norms and MONAI's decoder padding put back (the network before
:class:`layers.semantic.InstanceNorm`; same weights), the 10 GN iterations on ready features and, with
``--second-ckpt``, ``register`` of a second model (e.g. ``checkpoints/hippocampus_learngn_fast.ckpt``), then
lists the GN stages (the ``gn.*`` profiler ranges of ``layers/gn.py``) and
the operators with the most CPU time in one registration (torch profiler). ``--json`` also writes the medians to a
file; ``--before`` reads such a file from an earlier run (e.g. of an older commit, this script copied into its
tree) and adds a before/after table. Writes ``benchmarks/results/learngn_profile.md``; skips when the
Hippocampus data is absent.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path

import torch
from torch.profiler import profile

from benchmarks.common import REPO, RESULTS, dataset_json, now, paired_medians, write_page
from data.checkpoint import model_from_checkpoint
from data.datamodule import RegistrationDataModule
from layers.semantic import InstanceNorm, SemanticNet
from lightning_modules.learngn import LearnGN

#: the timed parts, in the order of the tables
PARTS = {"register": "`register` (features + GN iterations)",
         "features": "features: MIND-SSC + the U-Net on both images",
         "unet": "the U-Net on both images (`semantic_maps`)",
         "unet_monai": "the same U-Net with PyTorch's instance norms and MONAI's decoder padding (the code before)",
         "gn": "the GN iterations on ready features",
         "register_bf16": "`register` with the U-Net in bfloat16 (`semantic_precision=bf16`)",
         "second": "`register` of the `--second-ckpt` model",
         "second_bf16": "`register` of the `--second-ckpt` model with the U-Net in bfloat16"}
STAGES = ("gn.warp", "gn.jf", "gn.normal_equations", "gn.solve")


def main(argv: list[str] | None = None) -> None:
    """Time and profile one registration of the checkpoint's model, write the page."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.learngn_profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="checkpoints/hippocampus_learngn.ckpt")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", type=Path, help="also write the medians (seconds) and the load to this file")
    p.add_argument("--before", type=Path, help="the --json file of an earlier run, for a before/after table")
    p.add_argument("--second-ckpt", help="a second LearnGN checkpoint whose register is timed alongside")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    data = dataset_json("Hippocampus")
    if not data.is_file():
        print(f"skipped: {data} not found")
        return
    dm = RegistrationDataModule(source=str(data), eval_batch_size=1)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    model, _ = model_from_checkpoint(REPO / a.ckpt, base=LearnGN)
    load_start = os.getloadavg()[0]
    with torch.no_grad():
        fixed, moving = model.features(batch)
        weights = model.channel_weights()
        pair = torch.cat([batch["fixed"], batch["moving"]])
        before = monai_unet(model.semantic_net)
        fns = {"register": lambda: model.register(batch), "features": lambda: model.features(batch),
               "unet": lambda: model.semantic_maps(batch), "unet_monai": lambda: before(pair),
               "gn": lambda: model.gn(fixed, moving, channel_weights=weights),
               "register_bf16": lambda: bf16(model).register(batch)}
        if a.second_ckpt:
            second, _ = model_from_checkpoint(REPO / a.second_ckpt, base=LearnGN)
            fns["second"] = lambda: second.register(batch)
            fns["second_bf16"] = lambda: bf16(second).register(batch)
        seconds = dict(zip(fns, paired_medians(list(fns.values()), a.repeats)))
        with profile() as prof:
            model.register(batch)
    load = (load_start, os.getloadavg()[0])
    record = {"seconds": seconds, "load": load, "threads": a.threads, "when": now(seconds=False)}
    if a.json:
        a.json.write_text(json.dumps(record, indent=1))
    events = prof.key_averages()
    stage_ms = {e.key: e.cpu_time_total / 1e3 for e in events if e.key in STAGES}
    table = events.table(sort_by="self_cpu_time_total", row_limit=12)
    lines = ["# One LearnGN registration: where the time goes", "",
             f"Command: `python -m benchmarks.learngn_profile --ckpt {a.ckpt} --threads {a.threads} --repeats "
             f"{a.repeats}{' --second-ckpt ' + a.second_ckpt if a.second_ckpt else ''}` "
             f"({record['when']}, {os.cpu_count()} CPUs, 1-minute load average {load[0]:.1f} at the "
             f"start, {load[1]:.1f} at the end); the first Hippocampus val pair, 64³.", "",
             f"| part | seconds (median of {a.repeats}) |", "|---|---|"]
    lines += [f"| {label} | {seconds[k]:.3f} |" for k, label in PARTS.items() if k in seconds]
    lines += ["", f"In this run the U-Net takes {seconds['unet'] / seconds['unet_monai']:.2f}× the time of the code "
              f"before (the ratio of the medians of the two parts, run alternately)."]
    if a.before:
        before = json.loads(a.before.read_text())
        lines += ["", f"Before / after (the earlier run: {before['when']}, {before['threads']} threads, load "
                  f"{before['load'][0]:.1f} → {before['load'][1]:.1f}; the two runs one after the other):", "",
                  "| part | before (s) | after (s) | speed-up |", "|---|---|---|---|"]
        lines += [f"| {label} | {before['seconds'][k]:.3f} | {seconds[k]:.3f} | "
                  f"{before['seconds'][k] / seconds[k]:.2f}× |" for k, label in PARTS.items()
                  if k in before["seconds"] and k in seconds]
    lines += ["", "GN stages in one registration (CPU time of the `gn.*` profiler ranges, summed over the "
              "iterations):", "", "| stage | ms |", "|---|---|"]
    lines += [f"| `{k}` | {stage_ms[k]:.0f} |" for k in STAGES if k in stage_ms]
    lines += ["", "Operators with the most CPU time in one registration (torch profiler):", "", "```", table,
              "```", ""]
    write_page(RESULTS / "learngn_profile.md", lines)


_BF16: dict[int, LearnGN] = {}


def bf16(model: LearnGN) -> LearnGN:
    """A copy of ``model`` whose U-Net runs in bfloat16 (made once per model)."""
    if id(model) not in _BF16:
        _BF16[id(model)] = copy.deepcopy(model)
        _BF16[id(model)].configure_inference(semantic_precision="bf16")
    return _BF16[id(model)]


def monai_unet(net: SemanticNet) -> torch.nn.Module:
    """A copy of ``net``'s U-Net with PyTorch's instance norms (the same parameters) and MONAI's decoder padding
    put back: the network as it ran before :class:`layers.semantic.InstanceNorm` (same values to rounding)."""
    from monai.networks.nets.basic_unet import UpCat

    ref = copy.deepcopy(net.net)
    for name, module in list(ref.named_modules()):
        if isinstance(module, InstanceNorm):
            norm = torch.nn.InstanceNorm3d(module.weight.numel(), eps=module.eps, affine=True)
            norm.weight, norm.bias = module.weight, module.bias
            parent, _, child = name.rpartition(".")
            setattr(ref.get_submodule(parent), child, norm)
        elif isinstance(module, UpCat):
            module.is_pad = True
    return ref


if __name__ == "__main__":
    main()
