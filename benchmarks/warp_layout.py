"""Benchmark: CPU 3D warps: channels-first vs channels-last memory layout, and one call vs slabs over threads.

    python -m benchmarks.warp_layout [--threads 2] [--repeats 7]

Times the project's warp (:func:`layers.grid.sample_displaced`, trilinear, border padding) forward and
forward + backward with respect to the displacement, on 12-channel MIND-like features at the size of the
Adam stage of ConvexAdam / AdamIO on BrainPair (half resolution, 80×96×112) and at the 64³ synthetic size,
with the moving features as given (channels first) and after :func:`layers.grid.channels_last`. Also one
whole step of the Adam instance-optimisation loop (:class:`layers.optim.objective.FeatureMSE`
with three smoothing passes and the diffusion term), which stores the moving features channels-last.
Then :func:`layers.grid.grid_sample` on one volume in one call (``slabs=1``, PyTorch's CPU kernel then uses one
thread) against the automatic split into slabs over the threads (:func:`layers.grid.slab_count`), for a
1-channel image, a 3-channel field (one scaling-and-squaring step warps a field by itself) and 12-channel
features at 80×96×112. Medians of ``--repeats`` runs, the compared variants alternating, all in one process;
results in ``benchmarks/results/warp_layout.md``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import RESULTS, load_average, paired_medians, torch_threads, write_page
from layers.diff import diffusion
from layers.grid import channels_last, grid_sample, sample_displaced, slab_count, to_normalised
from layers.optim import FeatureMSE, smooth


def main(argv: list[str] | None = None) -> int:
    """Time the variants and write the page (and print it)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.warp_layout", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS / "warp_layout.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    rows = []
    for shape in ((80, 96, 112), (64, 64, 64)):
        image = torch.rand(1, 12, *shape, generator=g)
        coarse = torch.randn(1, 3, *[max(2, s // 8) for s in shape], generator=g) * 3
        u = F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)
        weight = torch.randn(1, 12, *shape, generator=g)
        fns = {}
        for layout, img in (("channels first", image), ("channels last", channels_last(image, min_voxels=0))):
            def fwd(img=img, u=u):
                with torch.no_grad():
                    sample_displaced(img, u)

            def fwd_bwd(img=img, u=u, weight=weight):
                v = u.clone().requires_grad_()
                (sample_displaced(img, v) * weight).sum().backward()

            fns[layout] = (fwd, fwd_bwd)
        t = paired_medians([fns["channels first"][0], fns["channels last"][0]], args.repeats)
        t2 = paired_medians([fns["channels first"][1], fns["channels last"][1]], args.repeats)
        cf, cl = (t[0], t2[0]), (t[1], t2[1])
        rows.append(f"| warp 12×{'×'.join(map(str, shape))} | {cf[0] * 1e3:.0f} | {cl[0] * 1e3:.0f} | "
                    f"{cf[0] / cl[0]:.2f} | {cf[1] * 1e3:.0f} | {cl[1] * 1e3:.0f} | {cf[1] / cl[1]:.2f} |")

    shape = (80, 96, 112)
    fixed, moving = torch.rand(1, 12, *shape, generator=g), torch.rand(1, 12, *shape, generator=g)
    delta = torch.zeros(1, 3, *shape, requires_grad=True)
    steps = []
    for layout in ("channels first", "channels last"):
        sim = FeatureMSE(fixed, moving)
        if layout == "channels first":  # undo the layout FeatureMSE chose, to measure its effect
            sim.moving = sim.moving.contiguous()

        def step(sim=sim):
            v = smooth(delta, 3)
            (12 * sim(v) + 1.25 * diffusion(v)).backward()

        steps.append(step)
    cf, cl = paired_medians(steps, args.repeats)

    slab_rows = []
    shape = (80, 96, 112)
    coarse = torch.randn(1, 3, *[s // 8 for s in shape], generator=g) * 3
    u = F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)
    ident = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij"))
    grid = to_normalised(torch.movedim(ident[None] + u, 1, -1), shape).contiguous()
    k = slab_count(grid)
    for channels in (1, 3, 12):
        image = torch.rand(1, channels, *shape, generator=g)
        weight = torch.randn(1, channels, *shape, generator=g)
        fns = []
        for slabs in (1, None):
            def fwd(image=image, slabs=slabs):
                with torch.no_grad():
                    grid_sample(image, grid, slabs=slabs)

            def fwd_bwd(image=image, weight=weight, slabs=slabs):
                img, gr = image.clone().requires_grad_(), grid.clone().requires_grad_()
                (grid_sample(img, gr, slabs=slabs) * weight).sum().backward()

            fns.append((fwd, fwd_bwd))
        t = paired_medians([fns[0][0], fns[1][0]], args.repeats)
        t2 = paired_medians([fns[0][1], fns[1][1]], args.repeats)
        slab_rows.append(f"| {channels}×{'×'.join(map(str, shape))} | {t[0] * 1e3:.0f} | {t[1] * 1e3:.0f} | "
                         f"{t[0] / t[1]:.2f} | {t2[0] * 1e3:.0f} | {t2[1] * 1e3:.0f} | {t2[0] / t2[1]:.2f} |")

    text = [
        "# CPU 3D warps: channels-first vs channels-last features",
        "",
        f"Command: `python -m benchmarks.warp_layout --threads {args.threads} --repeats {args.repeats}`; "
        f"{torch_threads(args.threads)}, load average {load_average()} at the end. Medians in ms, the two layouts "
        "run alternately in one process.",
        "",
        "| case | forward, first | forward, last | ratio | fwd + bwd, first | fwd + bwd, last | ratio |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"One Adam instance-optimisation step at BrainPair half resolution (12-channel features 80×96×112, three "
        f"smoothing passes, MSE + diffusion, forward and backward): channels first {cf * 1e3:.0f} ms, channels "
        f"last {cl * 1e3:.0f} ms (ratio {cf / cl:.2f}).",
        "",
        f"## One call vs {k} slabs over the threads (`layers.grid.grid_sample`, one volume)",
        "",
        "Forward, and forward + backward with respect to the image and the grid; medians in ms.",
        "",
        "| image | forward, 1 call | forward, slabs | ratio | fwd + bwd, 1 call | fwd + bwd, slabs | ratio |",
        "|---|---|---|---|---|---|---|",
        *slab_rows,
        "",
    ]
    write_page(args.out, text)
    print("\n".join(text))  # a benchmark script's report, not library code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
