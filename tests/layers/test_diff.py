"""Finite differences (layers/diff.py): gradient, Jacobian determinant, diffusion regulariser."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from layers.diff import diffusion, jacobian_determinant, log_jacobian_energy, safe_log, spatial_gradient
from layers.grid import identity_grid

F64 = torch.float64


def _close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-12) -> None:
    assert_close(actual, expected, atol=atol, rtol=0)


def _affine(a: np.ndarray, t: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    x = identity_grid(shape, dtype=F64)
    n = len(shape)
    ux = torch.einsum("ij,bj...->bi...", torch.as_tensor(a, dtype=F64), x)
    return ux + torch.as_tensor(t, dtype=F64).view(1, n, *([1] * n))


def test_spatial_gradient_shape_and_axis_order():
    x = identity_grid((4, 5, 6), dtype=F64)  # channel i = x_i
    g = spatial_gradient(x)
    assert g.shape == (1, 3, 3, 4, 5, 6)
    # d x_i / d x_j = delta_ij everywhere (borders included)
    _close(g, torch.eye(3, dtype=F64).view(1, 3, 3, 1, 1, 1).expand_as(g))


def test_spatial_gradient_of_quadratic():
    shape = (7, 8)
    x = identity_grid(shape, dtype=F64)[0]
    f = (x[0] ** 2 + 3 * x[0] * x[1] - x[1] ** 2)[None, None]  # (1, 1, 7, 8)
    g = spatial_gradient(f)[0, 0]  # (2, 7, 8)
    # central differences are exact for quadratics in the interior
    _close(g[0, 1:-1, :], (2 * x[0] + 3 * x[1])[1:-1, :])
    _close(g[1, :, 1:-1], (3 * x[0] - 2 * x[1])[:, 1:-1])
    # one-sided at the borders: f(1) - f(0) and f(S-1) - f(S-2) along the axis
    _close(g[0, 0, :], (f[0, 0, 1] - f[0, 0, 0]))
    _close(g[0, -1, :], (f[0, 0, -1] - f[0, 0, -2]))
    # hand value: d/dx0 at (0, 2) = [1 + 3*2 - 4] - [0 - 4] = 7
    assert g[0, 0, 2].item() == pytest.approx(7.0, abs=1e-12)


@pytest.mark.parametrize(
    "a,t",
    [
        (np.array([[0.2, -0.1], [0.3, 0.15]]), np.array([1.0, -2.0])),
        (np.array([[0.1, -0.05, 0.02], [0.03, -0.2, 0.04], [-0.01, 0.06, 0.15]]), np.array([0.5, 1.0, -3.0])),
        (np.array([[-2.5, 0.0, 0.0], [0.0, 0.1, 0.0], [0.0, 0.0, 0.0]]), np.zeros(3)),  # folding: det < 0
    ],
)
def test_jacobian_determinant_of_affine_field_is_exact_everywhere(a, t):
    n = a.shape[0]
    shape = (6, 7, 8)[:n]
    u = _affine(a, t, shape)
    jac = jacobian_determinant(u)
    assert jac.shape == (1, *shape)
    expected = float(np.linalg.det(np.eye(n) + a))
    _close(jac, torch.full((1, *shape), expected, dtype=F64))


def test_jacobian_determinant_uses_du_i_dx_j():
    # a shear u_0 = 0.5 x_1 has det 1; a pure stretch u_1 = 0.5 x_1 has det 1.5; together det = 1.5
    shape = (5, 6)
    x = identity_grid(shape, dtype=F64)
    u = torch.cat([0.5 * x[:, 1:], 0.5 * x[:, 1:]], 1)
    _close(jacobian_determinant(u), torch.full((1, *shape), 1.5, dtype=F64))
    with pytest.raises(ValueError):
        jacobian_determinant(torch.zeros(1, 3, 4, 4))


@pytest.mark.parametrize("shape", [(7, 9), (5, 6, 7)])
def test_jacobian_determinant_of_a_random_field_matches_numpy(shape):
    # per voxel: numpy.linalg.det(I + numpy.gradient(u)) (an independent reference for the explicit formulas)
    n = len(shape)
    u = torch.randn(2, n, *shape, generator=torch.Generator().manual_seed(4), dtype=F64)
    jac = jacobian_determinant(u).numpy()
    for b in range(2):
        grads = np.stack([np.stack(np.gradient(u[b, i].numpy(), edge_order=1)) for i in range(n)])  # (n, n, *S)
        ref = np.linalg.det(np.moveaxis(np.moveaxis(grads + np.eye(n).reshape(n, n, *([1] * n)), 0, -1), 0, -1))
        np.testing.assert_allclose(jac[b], ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(6, 9), (4, 5, 7)])
def test_diffusion_of_linear_field_closed_form(shape):
    n = len(shape)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen, dtype=F64)
    u = _affine(a.numpy(), np.arange(n, dtype=float), shape)
    u = torch.cat([u, 2 * u])  # batch of 2
    # forward difference along axis j of component i is A_ij (2 A_ij in item 1); mean over items and
    # components, summed over axes: (1 + 4) / 2 * ||A||_F^2 / n
    expected = 2.5 * (a**2).sum().item() / n
    assert diffusion(u).item() == pytest.approx(expected, rel=1e-12)
    assert diffusion(torch.full((1, n, *shape), 3.0, dtype=F64)).item() == 0.0


def test_diffusion_hand_value():
    u = torch.zeros(1, 2, 2, 3, dtype=F64)
    u[0, 0, 1, :] = 1.0  # a step along axis 0 in component 0
    # axis 0: the differences (shape (1, 2, 1, 3)) are 1 in component 0, 0 in component 1 -> mean 0.5;
    # axis 1: all 0
    assert diffusion(u).item() == pytest.approx(0.5, abs=1e-15)
    u.requires_grad_(True)
    diffusion(u).backward()
    assert u.grad is not None and torch.isfinite(u.grad).all()


def test_safe_log_values_and_continuation():
    x = torch.tensor([2.0, 0.5, 0.01, 0.0, -1.0], dtype=F64)
    out = safe_log(x, 0.01)
    _close(out[:3], torch.log(x[:3]))
    # linear continuation below eps: log(eps) + (x - eps) / eps, continuous at eps with slope 1/eps
    _close(out[3:], np.log(0.01) + (x[3:] - 0.01) / 0.01)
    xr = x.clone().requires_grad_()
    grad, = torch.autograd.grad(safe_log(xr, 0.01).sum(), xr)
    _close(grad, torch.tensor([0.5, 2.0, 100.0, 100.0, 100.0], dtype=F64))
    with pytest.raises(ValueError, match="eps"):
        safe_log(x, 0.0)


@pytest.mark.parametrize("a,expected_det", [
    (np.array([[0.2, 0.0], [0.0, 0.0]]), 1.2),                    # stretch
    (np.array([[0.0, 0.7], [0.0, 0.0]]), 1.0),                    # shear: volume preserving, no cost
    (np.array([[-0.5, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]), 0.5),
    (np.array([[-1.5, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]), -0.5),  # folded
])
def test_log_jacobian_energy_of_affine_fields(a, expected_det):
    n = a.shape[0]
    u = _affine(a, np.zeros(n), (6, 7, 8)[:n])
    eps = 1e-2
    log_det = np.log(expected_det) if expected_det > eps else np.log(eps) + (expected_det - eps) / eps
    assert log_jacobian_energy(u, eps).item() == pytest.approx(log_det**2, abs=1e-12)
    # expansion and compression by the same factor cost the same
    if expected_det == 1.2:
        shrink = _affine(np.array([[1 / 1.2 - 1, 0.0], [0.0, 0.0]]), np.zeros(2), (6, 7))
        assert log_jacobian_energy(shrink).item() == pytest.approx(log_det**2, abs=1e-12)


def test_log_jacobian_energy_gradcheck():
    u = (0.2 * torch.randn(1, 3, 4, 5, 4, generator=torch.Generator().manual_seed(5), dtype=F64)).requires_grad_()
    assert torch.autograd.gradcheck(log_jacobian_energy, (u,))
