"""Batched matrix-free preconditioned conjugate gradients in torch (the ``"torch"`` and ``"graph"`` backends).

:func:`cg` is one preconditioned CG loop over a whole batch: every batch item has its own step sizes, its own
convergence test ``‖b − A x‖ / ‖b‖ ≤ rtol`` and its own iteration count; converged items are frozen (their
``x`` no longer changes) while the others continue. Runs on any device.

:class:`GraphedCG` runs the *same* loop (the same kernels on the same numbers, hence the same iterates and
iteration counts) as CUDA graphs replayed on fixed buffers: one graph sets the loop up, one runs a block of
``block`` iterations (items that converged or reached ``maxiter`` are frozen inside the graph, so a block may
run past convergence without changing ``x``), one computes the final residual. The host only checks "all
items done" once per block. This removes the launch overhead that dominates small GN systems on a GPU
(docs/design.md §3). Both share the state machine :class:`_PCGLoop` below, the one CG loop of the package
(the ``"cupy"`` backend's CG is :func:`layers.cupy_backend.cg_cupy`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

__all__ = ["CGResult", "GraphedCG", "Operator", "cg"]

#: A linear operator / preconditioner: ``f(x) -> A x`` for ``x`` of the shape of ``b``. If the callable has a
#: truthy attribute ``accepts_out``, the CG loop calls it as ``f(x, out=buf)`` and it must write ``A x`` into
#: ``buf`` (and return it): this avoids one allocation per call.
Operator = Callable[..., torch.Tensor]


class CGResult(NamedTuple):
    """Result of a batched CG solve.

    Attributes:
        x: solution, same shape as ``b`` ``(B, ...)``.
        iterations: ``(B,)`` int64, CG iterations used by each item.
        rel_residual: ``(B,)`` final relative residual ``‖b − A x‖ / ‖b‖`` (recomputed from ``x`` when
            ``true_residual=True``; 0 for a zero right-hand side), dtype of ``b``.
        converged: ``(B,)`` bool, whether the item's recursive residual met ``rtol`` within ``maxiter``
            iterations (the recomputed ``rel_residual`` can differ from it by rounding).
    """

    x: torch.Tensor
    iterations: torch.Tensor
    rel_residual: torch.Tensor
    converged: torch.Tensor


def cg(
    operator: Operator,
    b: torch.Tensor,
    *,
    precond: Operator | None = None,
    x0: torch.Tensor | None = None,
    rtol: float = 1e-3,
    maxiter: int = 1000,
    check_every: int | None = None,
    true_residual: bool = True,
) -> CGResult:
    """Batched (preconditioned) conjugate gradients for SPD systems ``A x = b``, one per batch item.

    Args:
        operator: ``A``: maps ``(B, ...)`` to ``(B, ...)``, acting on each batch item separately; symmetric
            positive definite per item (see :data:`Operator` for the optional ``out=`` protocol).
        b: right-hand sides ``(B, ...)``, floating point.
        precond: ``M ≈ A⁻¹`` (SPD), same calling convention as ``operator``; ``None`` for plain CG.
        x0: initial guess, shape of ``b`` (not modified). Items whose ``b`` is zero ignore it.
        rtol: relative tolerance: item ``k`` stops when ``‖r_k‖ ≤ rtol ‖b_k‖`` (recursive residual).
        maxiter: maximum number of iterations (for every item).
        check_every: test "all items converged" (a host synchronisation on GPU) every this many iterations;
            default 1 on CPU and 8 on other devices. Converged items are frozen in between, so the result
            and the iteration counts do not depend on it.
        true_residual: recompute ``‖b − A x‖`` from the final ``x`` (one extra operator call) for the
            reported ``rel_residual``; otherwise report the recursive residual.

    Returns:
        :class:`CGResult` ``(x, iterations, rel_residual, converged)``. A zero right-hand side gives
        ``x = 0``, 0 iterations and residual 0.
    """
    _check_settings(rtol, maxiter)
    if x0 is not None and x0.shape != b.shape:
        raise ValueError(f"x0 must have the shape of b {tuple(b.shape)}; got {tuple(x0.shape)}")
    if check_every is None:
        check_every = 1 if b.device.type == "cpu" else 8
    b = b.contiguous()
    with torch.autocast(b.device.type, enabled=False), torch.no_grad():
        loop = _PCGLoop(operator, precond, b, rtol=rtol, maxiter=maxiter)
        if x0 is not None:
            loop.x.copy_(x0.detach())
        loop.start(x0 is not None)
        for k in range(maxiter):
            if k % check_every == 0 and not bool(loop.active.any()):
                break
            loop.iterate(capped=False)
        loop.finish(true_residual)
        return loop.result(copy=False)


class GraphedCG:
    """:func:`cg` for one operator, preconditioner and right-hand-side shape, replayed as CUDA graphs.

    The operator and the preconditioner must read their data from fixed tensors (the caller refreshes those
    in place before each :meth:`solve`, e.g. ``static_blocks.copy_(blocks)``). The graphs are captured on the
    first :meth:`solve` (after one eager warm-up pass on a side stream, as CUDA graph capture requires);
    later solves copy ``b`` (and ``x0``) into fixed buffers and replay them. Results equal those of
    :func:`cg` with ``check_every=block`` (same kernels on the same numbers).

    Args:
        operator, precond: as for :func:`cg`, bound to fixed tensors.
        shape: ``(B, ...)``, the shape of ``b``.
        dtype, device: of ``b``. On a CUDA device the stages are captured and replayed as CUDA graphs;
            on any other device they run eagerly, in the same order (the same loop, without the speed-up).
        block: iterations per replayed graph (the host checks convergence once per block).
    """

    def __init__(self, operator: Operator, precond: Operator | None, shape: tuple[int, ...],
                 dtype: torch.dtype, device: torch.device, block: int = 8) -> None:
        device = torch.device(device)
        if block < 1:
            raise ValueError(f"block must be >= 1; got {block}")
        self.block = int(block)
        self.shape = tuple(shape)
        with torch.no_grad():
            self._b = torch.zeros(self.shape, dtype=dtype, device=device)
            self._loop = _PCGLoop(operator, precond, self._b, rtol=1e-3, maxiter=1)
        loop = self._loop
        self._steps = {
            "start": lambda: loop.start(False),
            "start_x0": lambda: loop.start(True),
            "block": lambda: [loop.iterate(capped=True) for _ in range(self.block)],
            "finish": lambda: loop.finish(True),
            "finish_recursive": lambda: loop.finish(False),
        }
        self._graphs: dict[str, torch.cuda.CUDAGraph] | None = None if device.type == "cuda" else {}
        self.captured = False  #: whether the stages run as captured CUDA graphs

    def solve(self, b: torch.Tensor, *, x0: torch.Tensor | None = None, rtol: float = 1e-3,
              maxiter: int = 1000, true_residual: bool = True) -> CGResult:
        """Solve ``A x = b`` (``b`` of the fixed shape); the arguments mean what they mean for :func:`cg`.

        Returns:
            :class:`CGResult` with tensors of their own (copies of the fixed buffers).
        """
        _check_settings(rtol, maxiter)
        if tuple(b.shape) != self.shape:
            raise ValueError(f"b must have shape {self.shape} (the shape this solver was built for); got "
                             f"{tuple(b.shape)}")
        if x0 is not None and x0.shape != b.shape:
            raise ValueError(f"x0 must have the shape of b {tuple(b.shape)}; got {tuple(x0.shape)}")
        loop = self._loop
        with torch.autocast(self._b.device.type, enabled=False), torch.no_grad():
            if self._graphs is None:
                self._capture()
            loop.set_limits(rtol, maxiter)
            self._b.copy_(b)
            if x0 is not None:
                loop.x.copy_(x0)
            self._run("start_x0" if x0 is not None else "start")
            done = 0
            while done < maxiter and bool(loop.active.any()):
                self._run("block")
                done += self.block
            self._run("finish" if true_residual else "finish_recursive")
            return loop.result(copy=True)

    def _run(self, name: str) -> None:
        graph = self._graphs.get(name)
        if graph is not None:
            graph.replay()
        else:
            self._steps[name]()

    def _capture(self) -> None:
        """Warm up on a side stream, then capture every stage as a graph, all in one memory pool."""
        device = self._b.device
        with torch.cuda.device(device):
            self._capture_on(device)

    def _capture_on(self, device: torch.device) -> None:
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for step in self._steps.values():  # lazy initialisation (cuBLAS handles, ...) outside the capture
                step()
        torch.cuda.current_stream(device).wait_stream(side)
        pool = torch.cuda.graph_pool_handle()
        graphs = {}
        for name, step in self._steps.items():
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                step()
            graphs[name] = graph
        self._graphs = graphs
        self.captured = True


# ---------------------------------------------------------------------------------------------- the loop


class _PCGLoop:
    """The state and the three stages of batched PCG on fixed buffers, updated in place.

    Every per-item quantity lives in a buffer made once (``(B, 1, 1)`` scalars, ``(B, ...)`` vectors seen as
    ``(B, 1, M)`` rows and ``(B, M, 1)`` columns, so per-item dot products are ``bmm``'s), which lets the same
    stages run eagerly (:func:`cg`) or be captured into CUDA graphs (:class:`GraphedCG`).
    """

    def __init__(self, operator: Operator, precond: Operator | None, b: torch.Tensor, *, rtol: float,
                 maxiter: int) -> None:
        self.operator, self.precond, self.b = operator, precond, b
        bsz = b.shape[0]
        m = b[0].numel() if bsz > 0 else 0
        self.bsz = bsz
        self.x = torch.zeros_like(b)
        self.r = torch.empty_like(b)
        self.z = torch.empty_like(b) if precond is not None else self.r
        self.p = torch.empty_like(b)
        self.buf = torch.empty_like(b)  # operator output (A p)
        # (B, 1, M) row and (B, M, 1) column views of the vectors, made once
        self.b_r, self.x_r, self.r_r, self.z_r, self.p_r, self.buf_r = (
            t.view(bsz, 1, m) for t in (b, self.x, self.r, self.z, self.p, self.buf))
        self.b_c, self.r_c, self.z_c, self.buf_c = (t.view(bsz, m, 1) for t in (b, self.r, self.z, self.buf))
        scalar = b.new_zeros((bsz, 1, 1))
        self.bb, self.tol2, self.rr, self.rz = (scalar.clone() for _ in range(4))
        self.rel = scalar.clone()
        self.zero_rhs = torch.zeros((bsz, 1, 1), dtype=torch.bool, device=b.device)
        self.active = torch.zeros_like(self.zero_rhs)
        self.converged = torch.zeros_like(self.zero_rhs)
        self.iterations = torch.zeros((bsz, 1, 1), dtype=torch.int64, device=b.device)
        self.rtol2 = b.new_zeros(())
        self.maxiter = torch.zeros((), dtype=torch.int64, device=b.device)
        self.zero = b.new_zeros(())
        self.one = b.new_ones(())
        self.set_limits(rtol, maxiter)

    def set_limits(self, rtol: float, maxiter: int) -> None:
        self.rtol2.fill_(rtol * rtol)
        self.maxiter.fill_(maxiter)

    def apply(self, op: Operator, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        res = op(t, out=out) if getattr(op, "accepts_out", False) else op(t)
        return res if res is out else out.copy_(res)

    def start(self, has_x0: bool) -> None:
        """``x``: the initial guess (already in ``self.x`` when ``has_x0``) -> residual, direction, flags."""
        torch.bmm(self.b_r, self.b_c, out=self.bb)
        torch.eq(self.bb, 0, out=self.zero_rhs)
        torch.mul(self.bb, self.rtol2, out=self.tol2)
        if has_x0:
            self.x_r.masked_fill_(self.zero_rhs, 0.0)
            torch.sub(self.b, self.apply(self.operator, self.x, self.buf), out=self.r)
        else:
            self.x.zero_()
            self.r.copy_(self.b)
        torch.bmm(self.r_r, self.r_c, out=self.rr)
        torch.gt(self.rr, self.tol2, out=self.active)
        self.iterations.zero_()
        if self.precond is not None:
            self.apply(self.precond, self.r, self.z)
            torch.bmm(self.r_r, self.z_c, out=self.rz)
        else:
            self.rz.copy_(self.rr)
        self.p.copy_(self.z)

    def iterate(self, capped: bool) -> None:
        """One PCG iteration for the active items (``capped``: also freeze items that reached ``maxiter``)."""
        p_r, r_r = self.p_r, self.r_r
        if capped:
            self.active &= self.iterations < self.maxiter
        self.apply(self.operator, self.p, self.buf)
        alpha = torch.where(self.active, self.rz / torch.bmm(p_r, self.buf_c), self.zero)
        self.x_r.addcmul_(alpha, p_r)
        r_r.addcmul_(alpha, self.buf_r, value=-1.0)
        torch.bmm(r_r, self.r_c, out=self.rr)
        self.iterations += self.active
        self.active &= self.rr > self.tol2
        if self.precond is not None:
            self.apply(self.precond, self.r, self.z)
            rz_new = torch.bmm(r_r, self.z_c)
        else:
            rz_new = self.rr
        beta = torch.where(self.active, rz_new / self.rz, self.zero)
        torch.addcmul(self.z_r, beta, p_r, out=p_r)  # p = z + β p in one pass
        self.rz.copy_(rz_new)

    def finish(self, true_residual: bool) -> None:
        """The relative residual: recomputed from ``x`` (``true_residual``) or the recursive one."""
        torch.le(self.rr, self.tol2, out=self.converged)  # not ~active: an item may stop at maxiter (capped)
        rr = self.rr
        if true_residual:
            torch.sub(self.b, self.apply(self.operator, self.x, self.buf), out=self.buf)
            rr = torch.bmm(self.buf_r, self.buf_c)
        ratio = rr / torch.where(self.zero_rhs, self.one, self.bb)
        torch.where(self.zero_rhs, self.zero, torch.sqrt(ratio), out=self.rel)

    def result(self, copy: bool) -> CGResult:
        bsz = self.bsz
        out = CGResult(self.x, self.iterations.view(bsz), self.rel.view(bsz), self.converged.view(bsz))
        if copy:
            out = CGResult(*(t.clone() for t in out))
        return out


def _check_settings(rtol: float, maxiter: int) -> None:
    if maxiter < 0:
        raise ValueError(f"maxiter must be >= 0; got {maxiter}")
    if not rtol > 0:
        raise ValueError(f"rtol must be > 0; got {rtol}")
