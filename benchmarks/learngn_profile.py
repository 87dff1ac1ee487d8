"""Where the time of one LearnGN registration goes (a Hippocampus val pair, the shipped model).

    python -m benchmarks.learngn_profile [--ckpt checkpoints/hippocampus_learngn.ckpt] [--threads 2]

Times ``register`` (median of 5 after a warm-up), the features alone (MIND-SSC + the semantic U-Net on both
images) and the U-Net on one image, then lists the operators with the most CPU time in one registration (torch
profiler). Writes ``benchmarks/results/learngn_profile.md``; skips when the Hippocampus data is absent.
"""

from __future__ import annotations

import argparse
import os

import torch
from torch.profiler import profile

from benchmarks.common import REPO, RESULTS, dataset_json, now, paired_medians, write_page
from data.datamodule import RegistrationDataModule
from lightning_modules.checkpoint import model_from_checkpoint
from lightning_modules.learngn import LearnGN


def main(argv: list[str] | None = None) -> None:
    """Time and profile one registration of the checkpoint's model, write the page."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.learngn_profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="checkpoints/hippocampus_learngn.ckpt")
    p.add_argument("--threads", type=int, default=2)
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
    with torch.no_grad():
        # median of 5 after a warm-up, one part after the other
        total, feats, unet = [paired_medians([fn], 5)[0] for fn in (
            lambda: model.register(batch), lambda: model.features(batch),
            lambda: model.semantic_net(batch["fixed"]))]
        with profile() as prof:
            model.register(batch)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10)
    lines = ["# One LearnGN registration: where the time goes", "",
             f"Command: `python -m benchmarks.learngn_profile --ckpt {a.ckpt} --threads {a.threads}` "
             f"({now(seconds=False)}, {os.cpu_count()} CPUs, load average "
             f"{os.getloadavg()[0]:.1f}); the first Hippocampus val pair, 64³.", "",
             "| part | seconds (median of 5) |", "|---|---|",
             f"| `register` (features + 10 GN iterations) | {total:.3f} |",
             f"| features: MIND-SSC + the U-Net on both images | {feats:.3f} |",
             f"| the U-Net on one image | {unet:.3f} |", "",
             "Operators with the most CPU time in one registration (torch profiler):", "", "```", table, "```", ""]
    write_page(RESULTS / "learngn_profile.md", lines)


if __name__ == "__main__":
    main()
