"""Hypergradients with respect to the regularisation weight λ (docs/design.md §3, §5).

* :func:`layers.gn_solve` on a Tikhonov system with ``H = h·I`` per node, against the closed form
  ``dx/dλ = −A⁻¹ L x`` (dense solve) and the eigen decomposition of ``L``;
* one GN step and K GN iterations (:mod:`layers.gn`), against central finite differences (float64, CG rtol
  1e-12, relative error < 1e-4), for a scalar ``log λ`` shared by the iterations and for one λ per iteration.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from layers.gn import GNRegistration, gn_step
from layers.gn_solve import gn_solve
from layers.grid import identity_grid
from layers.laplacian import laplacian_csr
from layers.warp import warp_image

SOLVER = {"rtol": 1e-12, "maxiter": 5000, "strict": True, "eps": 0.0}
FD_REL = 1e-4


def _smooth_image(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 1, *shape, generator=g, dtype=torch.float64)
    for _ in range(3):
        x = F.avg_pool2d(x, 5, 1, 2, count_include_pad=False)
    return (x - x.mean()) / x.std()


def _pair(shape: tuple[int, ...] = (32, 32), amplitude: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    moving = _smooth_image(shape, 0)
    grid = identity_grid(shape, dtype=torch.float64)[0]
    truth = torch.stack(
        [
            amplitude * torch.sin(math.pi * grid[1] / shape[1]),
            amplitude * torch.cos(math.pi * grid[0] / shape[0] + 1.0),
        ]
    )[None]
    return warp_image(moving, truth), moving


def _weights(shape: tuple[int, ...], seed: int = 7) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


# ---------------------------------------------------------------------------------------- closed form


@pytest.mark.parametrize("coupling", ["full", "diagonal"])
def test_tikhonov_closed_form(coupling):
    """``(h I + λ L⊗I) x = b``: the implicit λ-gradient equals ``−wᵀ A⁻¹ L x`` (dense and eigen)."""
    grid, n, h = (6, 7), 2, 0.7
    nodes = grid[0] * grid[1]
    b = _weights((1, n, *grid), 1)
    w = _weights((1, n, *grid), 2)
    H = torch.zeros(1, n, n, *grid, dtype=torch.float64)
    H[:, range(n), range(n)] = h
    lam = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    x = gn_solve(H, b, lam, coupling=coupling, **SOLVER)
    (grad_lam,) = torch.autograd.grad((w * x).sum(), lam)

    lap = laplacian_csr(grid, dtype=torch.float64).to_dense()  # (N, N)
    a = h * torch.eye(nodes, dtype=torch.float64) + lam.detach() * lap
    bf, wf = b.reshape(n, nodes).T, w.reshape(n, nodes).T  # (N, n): one column per component
    x_dense = torch.linalg.solve(a, bf)
    dx_dense = -torch.linalg.solve(a, lap @ x_dense)  # dx/dλ = −A⁻¹ L x
    assert _rel_err(x.detach().reshape(n, nodes).T, x_dense) < 1e-10
    assert abs(float(grad_lam) - float((wf * dx_dense).sum())) < 1e-10 * abs(float(grad_lam))

    evals, evecs = torch.linalg.eigh(lap)  # L = V Λ Vᵀ: dx/dλ = −V Λ (h + λΛ)⁻² Vᵀ b
    coef = evecs.T @ bf
    dx_eig = -evecs @ (coef * (evals / (h + lam.detach() * evals) ** 2)[:, None])
    assert _rel_err(dx_eig, dx_dense) < 1e-10


def test_batched_lambda_gradient_per_item():
    """λ of shape ``(B,)``: each item's gradient equals its own closed form."""
    grid, n = (5, 6), 2
    H = torch.zeros(2, n, n, *grid, dtype=torch.float64)
    H[:, range(n), range(n)] = torch.tensor([0.5, 2.0], dtype=torch.float64).view(2, 1, 1, 1)
    b, w = _weights((2, n, *grid), 3), _weights((2, n, *grid), 4)
    lam = torch.tensor([0.4, 3.0], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad((w * gn_solve(H, b, lam, **SOLVER)).sum(), lam)
    lap = laplacian_csr(grid, dtype=torch.float64).to_dense()
    for i, h in enumerate((0.5, 2.0)):
        a = h * torch.eye(lap.shape[0], dtype=torch.float64) + float(lam[i].detach()) * lap
        x = torch.linalg.solve(a, b[i].reshape(n, -1).T)
        ref = -(w[i].reshape(n, -1).T * torch.linalg.solve(a, lap @ x)).sum()
        assert abs(float(g[i] - ref)) < 1e-10 * abs(float(ref))


# ------------------------------------------------------------------------------- through GN iterations


def _central_difference(fn, value: torch.Tensor, index: int, rel_step: float = 1e-5) -> float:
    step = rel_step * max(1.0, abs(float(value.detach().reshape(-1)[index])))
    plus, minus = value.detach().clone(), value.detach().clone()
    plus.view(-1)[index] += step
    minus.view(-1)[index] -= step
    return (float(fn(plus)) - float(fn(minus))) / (2 * step)


@pytest.mark.parametrize("coupling", ["full", "diagonal"])
def test_one_gn_step_hypergradient_matches_finite_differences(coupling):
    fixed, moving = _pair()
    u0 = 0.3 * _weights((1, 2, 8, 8), 5)
    w = _weights((1, 2, 8, 8), 6)

    def outer(log_lam: torch.Tensor) -> torch.Tensor:
        u = gn_step(fixed, moving, u0, log_lam.exp(), stride=4, coupling=coupling, **SOLVER)
        return (w * u).sum() + 0.1 * u.pow(2).sum()

    log_lam = torch.tensor(math.log(0.05), dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(outer(log_lam), log_lam)
    fd = _central_difference(outer, log_lam, 0)
    assert abs(fd) > 1e-6
    assert abs(float(g) - fd) < FD_REL * abs(fd), (float(g), fd)


@pytest.mark.parametrize("per_iteration", [False, True])
def test_k_gn_iterations_hypergradient_matches_finite_differences(per_iteration):
    """K = 4 GN iterations (warps re-linearised at every step) of the full-resolution field."""
    k = 4
    fixed, moving = _pair()
    gn = GNRegistration(iterations=k, stride=4, lam=(0.1, 0.02), solver=SOLVER)
    base = gn.lam.values().detach().to(torch.float64)
    w = _weights((1, 2, 32, 32), 8)
    target = 0.5 * _weights((1, 2, 32, 32), 9)

    def outer(log_lam: torch.Tensor) -> torch.Tensor:
        lam = log_lam.exp() if per_iteration else log_lam.exp() * base / base[0]  # (K,)
        disp = gn(fixed, moving, lam=lam).disp
        return (w * disp).mean() + (disp - target).pow(2).mean()

    init = base.log() if per_iteration else base[:1].log()
    log_lam = init.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(outer(log_lam), log_lam)
    for i in range(log_lam.numel()):
        fd = _central_difference(outer, log_lam, i)
        assert abs(fd) > 1e-8, i
        assert abs(float(g[i]) - fd) < FD_REL * abs(fd), (i, float(g[i]), fd)
