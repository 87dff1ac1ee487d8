"""Batched preconditioned CG (torch) against dense solves; per-item convergence and edge cases."""

from __future__ import annotations

import pytest
import torch

from layers.cg import GraphedCG, cg
from layers.cupy_backend import cupy_available


def _spd_batch(sizes_cond, m=30, seed=0):
    """``(B, m, m)`` SPD matrices with prescribed condition numbers (float64)."""
    g = torch.Generator().manual_seed(seed)
    mats = []
    for cond in sizes_cond:
        q, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
        ev = torch.logspace(0, float(torch.log10(torch.tensor(cond))), m, dtype=torch.float64)
        mats.append(q @ torch.diag(ev) @ q.T)
    return torch.stack(mats)


class _Dense:
    """Batched dense operator with the ``out=`` protocol."""

    accepts_out = True

    def __init__(self, a):
        self.a = a
        self.calls = 0

    def __call__(self, x, out=None):
        self.calls += 1
        y = torch.bmm(self.a, x.unsqueeze(-1)).squeeze(-1)
        if out is None:
            return y
        return out.copy_(y)


def test_matches_dense_solve_per_item():
    a = _spd_batch([1.0, 1e3, 1e2])
    b = torch.randn(3, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    res = cg(_Dense(a), b, rtol=1e-12, maxiter=500)
    ref = torch.linalg.solve(a, b)
    torch.testing.assert_close(res.x, ref, rtol=0, atol=1e-9)
    assert res.converged.all()
    assert (res.rel_residual <= 1e-11).all()
    # per-item counts: the identity-like item needs one iteration, the ill-conditioned one the most
    assert res.iterations[0] == 1
    assert res.iterations[1] > res.iterations[2] > res.iterations[0]


def test_converged_items_are_frozen():
    a = _spd_batch([10.0, 1e4])
    b = torch.randn(2, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    both = cg(_Dense(a), b, rtol=1e-8, maxiter=500)
    alone = cg(_Dense(a[:1]), b[:1], rtol=1e-8, maxiter=500)
    assert both.iterations[0] == alone.iterations[0] < both.iterations[1]
    # the same iterations on the same numbers: batched and single products round differently (float64, ~10
    # iterations on a system of condition 10), nothing more
    torch.testing.assert_close(both.x[0], alone.x[0], rtol=0, atol=1e-12 * float(alone.x.abs().max()))


def test_zero_rhs_and_x0():
    a = _spd_batch([10.0, 10.0])
    b = torch.randn(2, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    b[0] = 0
    x0 = torch.ones(2, 30, dtype=torch.float64)
    res = cg(_Dense(a), b, x0=x0, rtol=1e-10)
    assert torch.equal(res.x[0], torch.zeros(30, dtype=torch.float64))
    assert res.iterations[0] == 0 and res.rel_residual[0] == 0 and res.converged[0]
    assert torch.isfinite(res.x).all() and torch.isfinite(res.rel_residual).all()
    torch.testing.assert_close(res.x[1], torch.linalg.solve(a[1], b[1]), rtol=0, atol=1e-8)
    assert torch.equal(x0, torch.ones(2, 30, dtype=torch.float64))  # x0 untouched
    # starting at the solution needs no iteration
    exact = torch.linalg.solve(a, b)
    res2 = cg(_Dense(a), b, x0=exact, rtol=1e-8)
    assert (res2.iterations == 0).all()


def test_plain_callables_and_preconditioner():
    g = torch.Generator().manual_seed(4)
    d = torch.logspace(-1, 2, 200, dtype=torch.float64)[torch.randperm(200, generator=g)]
    off = 1e-3 * torch.randn(200, 200, dtype=torch.float64, generator=g)
    a = (torch.diag(d) + off @ off.T).unsqueeze(0)
    b = torch.randn(1, 200, dtype=torch.float64, generator=g)
    plain = cg(lambda x: torch.bmm(a, x.unsqueeze(-1)).squeeze(-1), b, rtol=1e-12, maxiter=1000)
    inv_diag = 1.0 / torch.diagonal(a, dim1=1, dim2=2)
    pre = cg(lambda x: torch.bmm(a, x.unsqueeze(-1)).squeeze(-1), b, precond=lambda r: r * inv_diag,
             rtol=1e-12, maxiter=1000)
    assert pre.converged.all() and plain.converged.all()
    assert pre.iterations[0] < plain.iterations[0] / 3
    # both solves are within cond(A)·rtol ≈ 1e3·1e-12 = 1e-9 (relative) of the solution: two different
    # iterations can only be compared to that accuracy (at rtol 1e-8 they differed by 6e-7 where 1e-6 was allowed)
    torch.testing.assert_close(pre.x, plain.x, rtol=1e-6, atol=0)
    torch.testing.assert_close(pre.x[0], torch.linalg.solve(a[0], b[0]), rtol=1e-6, atol=0)


def test_maxiter_reports_nonconvergence():
    a = _spd_batch([1e4])
    b = torch.randn(1, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    res = cg(_Dense(a), b, rtol=1e-12, maxiter=3)
    assert res.iterations.tolist() == [3]
    assert not res.converged.any()
    assert res.rel_residual[0] > 1e-12
    with pytest.raises(ValueError, match="rtol"):
        cg(_Dense(a), b, rtol=0.0)


def test_cupy_available_is_bool():
    assert isinstance(cupy_available(), bool)


def test_check_every_does_not_change_results():
    """The GPU default tests convergence every 8 iterations; frozen items make that invisible."""
    a = _spd_batch([10.0, 1e3])
    b = torch.randn(2, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    every = cg(_Dense(a), b, rtol=1e-9, maxiter=500, check_every=1)
    sparse = cg(_Dense(a), b, rtol=1e-9, maxiter=500, check_every=7)
    assert torch.equal(every.iterations, sparse.iterations)
    torch.testing.assert_close(sparse.x, every.x, rtol=0, atol=0)


def _graphed_vs_eager(device, dtype=torch.float64):
    a = _spd_batch([10.0, 1e3, 1e4]).to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(7)
    bs = [torch.randn(3, 30, dtype=torch.float64, generator=g).to(device=device, dtype=dtype) for _ in range(2)]
    bs[1][0] = 0  # a zero right-hand side among the items of the second solve
    op = _Dense(a)
    inv_diag = 1.0 / torch.diagonal(a, dim1=1, dim2=2)

    def precond(r, out=None):
        return torch.mul(r, inv_diag, out=out)

    precond.accepts_out = True
    solver = GraphedCG(op, precond, (3, 30), dtype, device, block=8)
    x0 = torch.ones(3, 30, dtype=dtype, device=device)
    cases = [dict(rtol=1e-9, maxiter=500), dict(rtol=1e-9, maxiter=5), dict(rtol=1e-6, maxiter=500, x0=x0)]
    for b in bs:  # the second right-hand side reuses the solver's buffers (and, on CUDA, its graphs)
        for kw in cases:
            got = solver.solve(b, **kw)
            ref = cg(op, b, precond=precond, check_every=8, **kw)
            yield kw, got, ref
    assert torch.equal(x0, torch.ones_like(x0))  # x0 untouched


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_graphed_cg_runs_the_same_loop_as_cg(device):
    """GraphedCG's stages (captured on CUDA, eager elsewhere) give cg's iterates: same iteration counts,
    same x and residuals (float64), including an iteration cap that is not a multiple of the block, a warm
    start, a zero right-hand side and a second solve on the same buffers."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA unavailable")
    for kw, got, ref in _graphed_vs_eager(device):
        assert torch.equal(got.iterations, ref.iterations), kw
        assert torch.equal(got.converged, ref.converged), kw
        torch.testing.assert_close(got.x, ref.x, rtol=0, atol=1e-12 * float(ref.x.abs().max()))
        torch.testing.assert_close(got.rel_residual, ref.rel_residual, rtol=1e-9, atol=1e-15)
        if kw["maxiter"] == 5:
            assert got.iterations.max() == 5 and not got.converged.all()


def test_graphed_cg_checks_its_arguments():
    a = _spd_batch([10.0])
    solver = GraphedCG(_Dense(a), None, (1, 30), torch.float64, "cpu")
    assert not solver.captured
    with pytest.raises(ValueError, match="b must have shape"):
        solver.solve(torch.zeros(2, 30, dtype=torch.float64))
    with pytest.raises(ValueError, match="rtol"):
        solver.solve(torch.zeros(1, 30, dtype=torch.float64), rtol=0.0)
    with pytest.raises(ValueError, match="block"):
        GraphedCG(_Dense(a), None, (1, 30), torch.float64, "cpu", block=0)
