"""How far Adam's first steps move the handcrafted 3D heads (why training collapsed on real data).

    python -m benchmarks.head_step_size [--steps 4] [--threads 2]

1. For the 3D heads of LearnGN on MIND-SSC (12 channels, stride 4) initialised to the handcrafted operators:
   each weight tensor's size, non-zero count and norm, and the relative change ``lr · sqrt(N) / ‖w‖`` of
   Adam's first step (``lr · sign(g)`` on every weight with a gradient) for several learning rates.
2. Measured: ``--steps`` Adam steps of ``LearnGN(features="mind", hidden=8)`` (the synthetic 3D recipe's heads) on
   Hippocampus training pairs (batch 2, the synthetic recipe's class-weighted label MSE) at lr 3e-3 and 1e-4:
   the relative change of each head weight after each step. Skipped when the data is absent.

Writes ``benchmarks/results/head_step_size.md``.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import RESULTS, dataset_json, now, write_page
from data.datamodule import RegistrationDataModule
from layers.heads import CompactHeads
from lightning_modules.learngn import LearnGN

#: the learning rates whose first Adam step is tabulated
LRS = (3e-3, 1e-3, 3e-4, 1e-4)


def main(argv: list[str] | None = None) -> None:
    """Tabulate the heads' first Adam steps, measure a few, write the page."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.head_step_size", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    started = now(seconds=False)
    lines = ["# Adam's first steps against the handcrafted 3D heads", "",
             f"Command: `python -m benchmarks.head_step_size --steps {a.steps} --threads {a.threads}` ({started}).",
             "", "## The handcrafted 3D heads (MIND-SSC, 12 channels, stride 4) and Adam's first step", "",
             "Adam's first update is `lr · sign(g)` on every weight with a gradient, so it changes a weight tensor "
             "by `lr · sqrt(N) / ‖w‖` relative to its norm; the zeros (the cross-channel terms) all move.", "",
             *weight_table(), "",
             f"## Measured: {a.steps} Adam steps of LearnGN (MIND, `hidden: 8`, class-weighted label MSE) on "
             "Hippocampus training pairs (batch 2)", "",
             "Relative change of each handcrafted head weight, `‖w − w₀‖ / ‖w₀‖`:", "", *measured(a.steps), ""]
    write_page(RESULTS / "head_step_size.md", lines)


def weight_table() -> list[str]:
    """The table of the handcrafted 3D heads' weights and the relative size of Adam's first step."""
    heads = CompactHeads(3, 12, 4)
    lines = ["| weight | entries | non-zero | norm | max abs | " + " | ".join(f"first step, lr {lr:g}" for lr in LRS)
             + " |", "|---|---|---|---|---|" + "---|" * len(LRS)]
    for name, p in heads.named_parameters():
        p = p.detach()
        n, norm = p.numel(), float(p.norm())
        steps = " | ".join(f"{100 * lr * n ** 0.5 / norm:.1f} %" for lr in LRS)
        lines.append(f"| `{name}` | {n} | {int((p != 0).sum())} | {norm:.3f} | {float(p.abs().max()):.4f} | "
                     f"{steps} |")
    return lines


def measured(steps: int) -> list[str]:
    """The table of the measured relative changes of the head weights over ``steps`` Adam steps."""
    data = dataset_json("Hippocampus")
    if not data.is_file():
        return [f"(skipped: {data} not found)"]
    dm = RegistrationDataModule(source=str(data), batch_size=2, max_pairs=64, cache_size=None)
    dm.setup("fit")
    batches = [b for _, b in zip(range(steps), dm.train_dataloader())]
    lines = ["| lr | weight | " + " | ".join(f"after step {k + 1}" for k in range(steps)) + " |",
             "|---|---|" + "---|" * steps]
    for lr in (3e-3, 1e-4):
        torch.manual_seed(0)
        model = LearnGN(spatial_dims=3, features="mind", iterations=10, stride=4, lam_start=0.3, lam_end=0.03,
                        hidden=8, lr=lr)
        start = {k: v.detach().clone() for k, v in model.heads.named_parameters()}
        opt = model.configure_optimizers()
        changes: dict[str, list[float]] = {k: [] for k, v in start.items() if v.norm() > 0}
        for batch in batches:
            loss = sum(model.loss_terms(batch, model.register(batch)).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            for k, p in model.heads.named_parameters():
                if k in changes:
                    changes[k].append(float((p.detach() - start[k]).norm() / start[k].norm()))
        lines += [f"| {lr:g} | `{k}` | " + " | ".join(f"{100 * c:.1f} %" for c in v) + " |"
                  for k, v in changes.items()]
    return lines


if __name__ == "__main__":
    main()
