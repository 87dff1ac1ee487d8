"""Benchmark of the differentiable GN solve (:func:`layers.gn_solve`) and writes ``results/gn_layer.md``.

For each grid (2D 80×78, 3D 32³, 48×40×64, 56×48×56 by default), full coupling, float32, ``rtol=1e-3``:

* forward time and forward+backward time (median of ``--repeats`` runs after one warm-up);
* CG iterations of the forward solve with and without the block-Jacobi preconditioner, of the backward
  solve, and the final relative residual;
* peak memory of the forward and of the forward+backward solve: on CPU the growth of the peak resident set
  size (``VmHWM`` after resetting it through ``/proc/self/clear_refs``) over the resident size before the
  call, measured in a child process started with ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed tensors
  really leave the resident set; on GPU ``torch.cuda.max_memory_allocated`` over the allocation before;
* on GPU every backend: torch, graph (the torch PCG replayed as CUDA graphs) and cupy (when available);
* one full GN iteration (:func:`layers.gn.gn_step`: warp, handcrafted J/f, normal equations, solve) when
  ``layers/gn.py`` exposes ``gn_step``.

Problem construction (stated in the report): ``J`` ``(1, C=12, n, *G)`` is white noise smoothed by three
3ⁿ box filters (replicate padding), normalised to unit standard deviation and multiplied by a spatial
amplitude ``exp(0.5·a)`` (``a`` an equally smoothed, normalised noise field: edge-like variations of the
data term, ``H``'s diagonal spans about 200× between its 1st and 99th percentiles);
``H = Σ_c J_cᵀ J_c``, ``b = −Σ_c J_cᵀ f_c`` with ``f`` smoothed noise; ``λ = 3 · median(diag H)``.

Run ``python -m benchmarks.gn_layer`` from the repository root (``--help`` for options); library code does not
print, this script reports on stdout and writes the markdown file.
"""

from __future__ import annotations

import os

# OpenMP's default spin-waiting makes multi-threaded timings erratic on a shared, oversubscribed machine
# (measured here: 0.5-5 s instead of 0.07 s for the 56×48×56 solve with 2 threads under load 8); passive
# waiting is set before torch loads OpenMP, unless the caller chose a policy. It is recorded in the report.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]

from layers.cupy_backend import cupy_available  # noqa: E402
from layers.gn_solve import gn_solve  # noqa: E402

DEFAULT_GRIDS = ["80x78", "32x32x32", "48x40x64", "56x48x56"]
SPREAD = 0.5  # amplitude exp(SPREAD * a) of the Jacobian
KAPPA = 3.0  # λ = KAPPA * median(diag H)
CHANNELS = 12


def parse_grid(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.lower().split("x"))


def smooth(x: torch.Tensor, reps: int = 3) -> torch.Tensor:
    """Three 3ⁿ box filters with replicate padding, ``(B, C, *G)``."""
    n = x.dim() - 2
    pool = F.avg_pool2d if n == 2 else F.avg_pool3d
    for _ in range(reps):
        x = pool(F.pad(x, (1,) * (2 * n), mode="replicate"), 3, 1)
    return x


def make_problem(grid: tuple[int, ...], device: torch.device, dtype=torch.float32, seed: int = 0):
    """``H`` ``(1, n, n, *G)``, ``b`` ``(1, n, *G)``, ``λ`` (float) of the documented construction."""
    n = len(grid)
    g = torch.Generator().manual_seed(seed)
    jac = smooth(torch.randn(1, CHANNELS * n, *grid, generator=g, dtype=torch.float64))
    jac = jac / jac.std()
    amp = smooth(torch.randn(1, 1, *grid, generator=g, dtype=torch.float64))
    jac = (jac * torch.exp(SPREAD * amp / amp.std())).view(1, CHANNELS, n, *grid)
    f = smooth(torch.randn(1, CHANNELS, *grid, generator=g, dtype=torch.float64))
    f = f / f.std()
    H = torch.einsum("bci...,bcj...->bij...", jac, jac)
    b = -torch.einsum("bci...,bc...->bi...", jac, f)
    lam = KAPPA * float(H.diagonal(dim1=1, dim2=2).median())
    return H.to(device, dtype).contiguous(), b.to(device, dtype).contiguous(), lam


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_stats(fn, device: torch.device, repeats: int) -> tuple[float, float, float, object]:
    """Median and minimum wall time and median process CPU time (ms, all threads) over ``repeats`` runs
    after one warm-up, and the last result."""
    out = fn()
    times, cpu = [], []
    for _ in range(repeats):
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    return statistics.median(times), min(times), statistics.median(cpu), out


def timed(fn, device: torch.device, repeats: int) -> tuple[float, object]:
    """Median wall time in ms over ``repeats`` runs after one warm-up; also returns the last result."""
    med, _, _, out = timed_stats(fn, device, repeats)
    return med, out


def fwd_bwd(H, b, lam, w, **kw):
    """Forward + backward through gn_solve w.r.t. H, b and a tensor λ."""
    hh = H.detach().requires_grad_()
    bb = b.detach().requires_grad_()
    ll = torch.tensor(lam, dtype=H.dtype, device=H.device, requires_grad=True)
    x = gn_solve(hh, bb, ll, **kw)
    (x * w).sum().backward()
    return hh.grad, bb.grad, ll.grad


# --------------------------------------------------------------------------------------------------- memory


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _peak_rss_mb(fn) -> float:
    """Growth of the peak RSS (MB) during ``fn()`` over the RSS before it (Linux only)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current RSS
    before = _status_kb("VmRSS")
    fn()
    return (_status_kb("VmHWM") - before) / 1024.0


def memory_probe(grid: tuple[int, ...], threads: int) -> dict:
    """Child-process entry: CPU peak memory of forward and forward+backward (MB)."""
    torch.set_num_threads(threads)
    device = torch.device("cpu")
    H, b, lam = make_problem(grid, device)
    w = torch.randn_like(b)
    gn_solve(H, b, lam)  # warm-up (caches, thread pool)
    fwd = _peak_rss_mb(lambda: gn_solve(H, b, lam))
    both = _peak_rss_mb(lambda: fwd_bwd(H, b, lam, w))
    inputs = (H.numel() + b.numel()) * H.element_size() / 2**20
    return {"fwd_mb": fwd, "fwd_bwd_mb": both, "inputs_mb": inputs}


def cpu_memory(grid: tuple[int, ...], threads: int) -> dict | None:
    if not (Path("/proc/self/clear_refs").exists() and Path("/proc/self/status").exists()):
        return None
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    cmd = [sys.executable, "-m", "benchmarks.gn_layer", "--memory-probe", "x".join(map(str, grid)),
           "--threads", str(threads)]
    try:
        out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=True, timeout=900)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError) as err:
        logging.getLogger(__name__).warning("memory probe failed for %s: %s", grid, err)
        return None


def gpu_peak_mb(fn, device: torch.device) -> float:
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


# ------------------------------------------------------------------------------------------------- GN step


def gn_step_time(grid, device, repeats, stride=4, channels=CHANNELS) -> str:
    """Median ms of one :func:`layers.gn.gn_step` (forward) on features at ``stride`` × the grid."""
    try:
        from layers import gn as gn_module
    except Exception as err:  # noqa: BLE001  (the module is optional / in progress)
        return f"n/a (layers.gn: {type(err).__name__})"
    if not hasattr(gn_module, "gn_step"):
        return "n/a (no layers.gn.gn_step)"
    shape = tuple(stride * g for g in grid)
    g = torch.Generator().manual_seed(1)
    fixed = smooth(torch.randn(1, channels, *shape, generator=g)).to(device)
    moving = smooth(torch.randn(1, channels, *shape, generator=g)).to(device)
    fixed = (fixed / fixed.std() * 20).contiguous()
    moving = (0.5 * fixed + 0.5 * moving / moving.std() * 20).contiguous()
    u = torch.zeros(1, len(grid), *grid, device=device)
    try:
        from layers.heads import handcrafted_jf

        jac, _ = handcrafted_jf(fixed, moving, stride)
        hess = torch.einsum("bci...,bcj...->bij...", jac, jac)
        lam = KAPPA * float(hess.diagonal(dim1=1, dim2=2).median())
        del jac, hess
        with torch.no_grad():
            ms, _ = timed(lambda: gn_module.gn_step(fixed, moving, u, lam, stride=stride, rtol=1e-3), device,
                          repeats)
    except Exception as err:  # noqa: BLE001  (report, do not fake a number)
        return f"n/a ({type(err).__name__}: {err})"[:80]
    return f"{ms:.0f}"


# ------------------------------------------------------------------------------------------------- main


def machine_info(device: torch.device, threads: int) -> list[str]:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = [
        f"- CPU: {cpu}, {os.cpu_count()} logical cores; torch threads: {threads}",
        f"- Python {platform.python_version()}, torch {torch.__version__}, {platform.platform()}",
    ]
    if device.type == "cuda":
        info.append(f"- GPU: {torch.cuda.get_device_name(device)}; cupy available: {cupy_available()}")
    return info


def run_grid(grid, device, backend, repeats, threads, with_memory, with_gn):
    H, b, lam = make_problem(grid, device)
    w = torch.randn_like(b)
    n_nodes = H[0, 0].numel()
    kw = dict(backend=backend, rtol=1e-3)
    # at least `repeats` runs, more for fast cases (about 1.5 s of forward solves, at most 200 runs)
    est, _ = timed(lambda: gn_solve(H, b, lam, **kw), device, 1)
    repeats = int(min(max(repeats, 1500.0 / max(est, 1e-3)), max(repeats, 200)))
    fwd_ms, fwd_min, fwd_cpu, (x, info) = timed_stats(lambda: gn_solve(H, b, lam, return_info=True, **kw),
                                                      device, repeats)
    both_ms, both_min, both_cpu, _ = timed_stats(lambda: fwd_bwd(H, b, lam, w, **kw), device, repeats)
    _, info_np = gn_solve(H, b, lam, precondition=False, return_info=True, **kw)
    _, info_bwd = gn_solve(H, w, lam, return_info=True, **kw)  # the backward solve: A y = x̄ with x̄ = w
    row = {
        "grid": "×".join(map(str, grid)),
        "unknowns": len(grid) * n_nodes,
        "repeats": repeats,
        "backend": info.backend,
        "lam": lam,
        "fwd_ms": fwd_ms,
        "fwd_min_ms": fwd_min,
        "fwd_bwd_ms": both_ms,
        "fwd_bwd_min_ms": both_min,
        "fwd_cpu_ms": fwd_cpu,
        "fwd_bwd_cpu_ms": both_cpu,
        "bwd_over_fwd": (both_ms - fwd_ms) / fwd_ms,
        "its": int(info.iterations[0]),
        "its_noprec": int(info_np.iterations[0]),
        "its_bwd": int(info_bwd.iterations[0]),
        "rel_res": float(info.rel_residual[0]),
        "mem_fwd": None,
        "mem_fwd_bwd": None,
        "gn_step": "",
    }
    if device.type == "cuda":
        row["mem_fwd"] = gpu_peak_mb(lambda: gn_solve(H, b, lam, **kw), device)
        row["mem_fwd_bwd"] = gpu_peak_mb(lambda: fwd_bwd(H, b, lam, w, **kw), device)
    elif with_memory:
        mem = cpu_memory(grid, threads)
        if mem:
            row["mem_fwd"], row["mem_fwd_bwd"] = mem["fwd_mb"], mem["fwd_bwd_mb"]
    if with_gn:
        row["gn_step"] = gn_step_time(grid, device, max(1, min(repeats, 3)))
    return row


def fmt_mb(v) -> str:
    if v is None:
        return "n/a"
    return "<0.1" if v < 0.05 else f"{v:.1f}"


def write_markdown(path: Path, rows, header_info, command, device, load_before, load_after, repeats):
    mem_how = ("peak RSS growth (VmHWM reset via /proc/self/clear_refs; child process with "
               "MALLOC_MMAP_THRESHOLD_=65536)" if device.type == "cpu" else
               "torch.cuda.max_memory_allocated minus the allocation before the call")
    lines = [
        "# GN layer benchmark (`layers.gn_solve`)",
        "",
        "Written by `benchmarks/gn_layer.py`; do not edit by hand.",
        "",
        f"Command: `{command}`",
        "",
        *header_info,
        f"- load average (1 min) before/after: {load_before:.2f} / {load_after:.2f} "
        "(other processes share the cores; timings under load are pessimistic)",
        f"- OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')} (set by the script unless given)",
        "",
        "Problem: full coupling, float32, batch 1, `rtol=1e-3`, default `maxiter` (1000), `eps=1e-6`. "
        f"`J` `(1, C={CHANNELS}, n, *G)`: white noise smoothed by three 3ⁿ box filters (replicate padding), "
        f"unit std, times a spatial amplitude `exp({SPREAD}·a)` with `a` an equally smoothed unit-std noise "
        "field (diag H spans ~200× between its 1st and 99th percentiles); `H = Σ_c J_cᵀJ_c`, "
        "`b = −Σ_c J_cᵀ f_c` with `f` smoothed unit-std noise; "
        f"**λ = {KAPPA:g} · median(diag H)**. Upstream gradient for the backward: standard normal.",
        "",
        f"Times: median (and minimum) of `runs` runs (at least {repeats}; more for fast cases, to about "
        "1.5 s of forward solves, at most 200) after one warm-up, wall clock, ms. "
        "`bwd/fwd` = (fwd+bwd − fwd) / fwd of the medians. `CPU ms` = median process CPU time of the same "
        "runs (all threads; less sensitive to other processes than wall time): fwd / fwd+bwd. "
        "`its` = forward CG iterations with the block-Jacobi preconditioner; `its (no prec.)` without it; "
        "`bwd its` = iterations of the backward solve `A y = x̄`. `rel. res.` = final ‖b − Ax‖/‖b‖ of the "
        f"forward solve. Memory: {mem_how}, MB. `GN iteration` = one `layers.gn.gn_step` forward "
        f"(stride 4, {CHANNELS}-channel smooth random features at 4× the grid: warp, handcrafted J/f, normal "
        "equations, solve), ms.",
        "",
        "| grid | unknowns | backend | λ | runs | fwd ms (min) | fwd+bwd ms (min) | bwd/fwd | CPU ms | its "
        "| its (no prec.) | bwd its | rel. res. | mem fwd MB | mem fwd+bwd MB | GN iteration ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['grid']} | {r['unknowns']} | {r['backend']} | {r['lam']:.3g} | {r['repeats']} "
            f"| {r['fwd_ms']:.1f} ({r['fwd_min_ms']:.1f}) "
            f"| {r['fwd_bwd_ms']:.1f} ({r['fwd_bwd_min_ms']:.1f}) "
            f"| {r['bwd_over_fwd']:.2f} | {r['fwd_cpu_ms']:.1f} / {r['fwd_bwd_cpu_ms']:.1f} "
            f"| {r['its']} | {r['its_noprec']} "
            f"| {r['its_bwd']} | {r['rel_res']:.2e} | {fmt_mb(r['mem_fwd'])} | {fmt_mb(r['mem_fwd_bwd'])} "
            f"| {r['gn_step'] or 'n/a'} |"
        )
    lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines), encoding="utf-8")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grids", nargs="+", default=DEFAULT_GRIDS, help="grid shapes like 56x48x56")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    parser.add_argument("--no-gn-step", action="store_true", help="skip timing layers.gn.gn_step")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gn_layer.md")
    parser.add_argument("--backends", nargs="+", default=None, choices=["torch", "graph", "cupy"],
                        help="gn_solve backends (default: torch on CPU; torch, graph and cupy on CUDA)")
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.memory_probe:
        print(json.dumps(memory_probe(parse_grid(args.memory_probe), args.threads)))
        return 0

    device = torch.device(args.device)
    backends = args.backends
    if backends is None:
        backends = ["torch"]
        if device.type == "cuda":
            backends.append("graph")
            if cupy_available():
                backends.append("cupy")
    load_before = os.getloadavg()[0]
    rows = []
    for text in args.grids:
        grid = parse_grid(text)
        for k, backend in enumerate(backends):
            row = run_grid(grid, device, backend, args.repeats, args.threads, not args.no_memory,
                           with_gn=not args.no_gn_step and k == 0)
            rows.append(row)
            print(json.dumps(row), flush=True)
    load_after = os.getloadavg()[0]
    command = "python -m benchmarks.gn_layer " + " ".join(argv if argv is not None else sys.argv[1:])
    write_markdown(args.out, rows, machine_info(device, args.threads), command.strip(), device, load_before,
                   load_after, args.repeats)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
