"""gn_solve: forward against dense solves, implicit backward against gradcheck and dense autograd, inputs."""

from __future__ import annotations

import importlib
import itertools
import logging
import math

import pytest
import torch

from layers import gn_solve
from layers.cupy_backend import cupy_available
from layers.gn_solve import GNSolveInfo, block_apply, block_inverse

EPS = 1e-6
GRIDS = [(5, 4), (3, 4, 5)]


def dense_laplacian(shape):
    """Dense free-boundary grid Laplacian from an explicit loop over edges (float64)."""
    n_nodes = math.prod(shape)
    strides = [math.prod(shape[k + 1:]) for k in range(len(shape))]
    lap = torch.zeros(n_nodes, n_nodes, dtype=torch.float64)
    for p in itertools.product(*(range(s) for s in shape)):
        i = sum(a * s for a, s in zip(p, strides))
        for d in range(len(shape)):
            if p[d] + 1 < shape[d]:
                j = i + strides[d]
                lap[i, j] = lap[j, i] = -1.0
                lap[i, i] += 1.0
                lap[j, j] += 1.0
    return lap


def dense_solve(H, b, lam, coupling="full", eps=EPS):
    """Differentiable dense reference: assemble A per item with torch ops, ``torch.linalg.solve``."""
    bsz, n = H.shape[:2]
    grid = tuple(H.shape[3:])
    n_nodes = math.prod(grid)
    lap = dense_laplacian(grid).to(H.dtype)
    lam_b = lam.expand(bsz) if torch.is_tensor(lam) and lam.dim() == 0 else lam
    xs = []
    for k in range(bsz):
        hk = H[k].reshape(n, n, n_nodes)
        if coupling == "diagonal":
            hk = hk * torch.eye(n, dtype=H.dtype).unsqueeze(-1)
        # blockdiag(H): entry (i*N + p, j*N + p) = H_ij(p)
        blocks = torch.cat([torch.cat([torch.diag(hk[i, j]) for j in range(n)], 1) for i in range(n)], 0)
        lam_k = lam_b[k] if torch.is_tensor(lam_b) else lam_b
        eye = torch.eye(n * n_nodes, dtype=H.dtype)
        a = blocks + lam_k * torch.kron(torch.eye(n, dtype=H.dtype), lap) + eps * eye
        xs.append(torch.linalg.solve(a, b[k].reshape(-1)).view(b.shape[1:]))
    return torch.stack(xs)


def random_problem(grid, bsz=2, seed=0, dtype=torch.float64, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    n = len(grid)
    m = torch.randn(bsz, n, 3, *grid, generator=g, dtype=dtype) * scale
    H = torch.einsum("bik...,bjk...->bij...", m, m)
    b = torch.randn(bsz, n, *grid, generator=g, dtype=dtype)
    return H, b


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("coupling", ["full", "diagonal"])
def test_forward_matches_dense(grid, coupling):
    H, b = random_problem(grid)
    lam = torch.tensor([0.3, 2.5], dtype=torch.float64)
    x, info = gn_solve(H, b, lam, coupling=coupling, rtol=1e-13, return_info=True)
    torch.testing.assert_close(x, dense_solve(H, b, lam, coupling), rtol=0, atol=1e-8)
    assert isinstance(info, GNSolveInfo) and info.backend == "torch"
    assert info.iterations.shape == (2,) and info.rel_residual.shape == (2,)
    assert info.converged.all() and (info.rel_residual <= 1e-12).all()
    # λ differs per item: item 1 (larger λ) is not the solution with item 0's λ
    x_same = gn_solve(H, b, 0.3, coupling=coupling, rtol=1e-13)
    assert not torch.allclose(x_same[1], x[1], atol=1e-6)
    torch.testing.assert_close(x_same[0], x[0], rtol=0, atol=1e-8)
    # without the preconditioner: same answer
    x_np = gn_solve(H, b, lam, coupling=coupling, rtol=1e-13, precondition=False)
    torch.testing.assert_close(x_np, x, rtol=0, atol=1e-8)


def test_diagonal_ignores_cross_terms():
    H, b = random_problem((4, 5))
    x1 = gn_solve(H, b, 1.0, coupling="diagonal", rtol=1e-12)
    h_diag = torch.diag_embed(torch.diagonal(H, dim1=1, dim2=2)).movedim(-2, 1).movedim(-1, 2)
    assert h_diag.shape == H.shape
    x2 = gn_solve(h_diag, b, 1.0, coupling="full", rtol=1e-12)
    torch.testing.assert_close(x1, x2, rtol=0, atol=1e-9)
    assert not torch.allclose(gn_solve(H, b, 1.0, coupling="full", rtol=1e-12), x1, atol=1e-4)


def test_float32():
    H, b = random_problem((8, 6, 5), bsz=1, dtype=torch.float32)
    x, info = gn_solve(H, b, 1.0, rtol=1e-4, return_info=True)
    ref = dense_solve(H.double(), b.double(), 1.0)
    assert x.dtype == torch.float32 and info.rel_residual.dtype == torch.float32
    assert info.rel_residual.item() <= 2e-4
    assert ((x.double() - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.parametrize("c", [1, 2, 3])
def test_block_inverse_and_apply(c):
    g = torch.Generator().manual_seed(12)
    m = torch.randn(2, c, c + 1, 4, 3, generator=g, dtype=torch.float64)
    eye = torch.eye(c, dtype=torch.float64).view(1, c, c, 1, 1)
    h = torch.einsum("bik...,bjk...->bij...", m, m) + 0.1 * eye
    inv = block_inverse(h)
    assert torch.equal(inv, inv.transpose(1, 2))
    ref = torch.linalg.inv(h.permute(0, 3, 4, 1, 2)).permute(0, 3, 4, 1, 2)
    torch.testing.assert_close(inv, ref, rtol=1e-10, atol=1e-10)
    x = torch.randn(2, c, 4, 3, generator=g, dtype=torch.float64)
    ref_x = torch.einsum("bij...,bj...->bi...", h, x)
    torch.testing.assert_close(block_apply(h, x), ref_x, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------- gradients


def _sym_param(m):
    """Symmetric PSD blocks from an unconstrained parameter: H = M Mᵀ + 0.5 I (per node)."""
    n = m.shape[1]
    eye = torch.eye(n, dtype=m.dtype).view(1, n, n, *([1] * (m.dim() - 3)))
    return torch.einsum("bik...,bjk...->bij...", m, m) + 0.5 * eye


@pytest.mark.parametrize(
    "grid,coupling,lam_shape,fast",
    [
        ((2, 3), "full", (2,), False),  # the full Jacobian on tiny grids
        ((3, 2), "diagonal", (), False),
        ((3, 4), "full", (), True),  # random projections (fast_mode) for the rest
        ((2, 3, 2), "full", (2,), True),
        ((2, 3, 2), "full", (), True),
        ((2, 3, 2), "diagonal", (2,), True),
    ],
)
def test_gradcheck(grid, coupling, lam_shape, fast):
    g = torch.Generator().manual_seed(7)
    n = len(grid)
    m = torch.randn(2, n, n, *grid, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, n, *grid, generator=g, dtype=torch.float64, requires_grad=True)
    lam = (0.5 + torch.rand(lam_shape, generator=g, dtype=torch.float64)).requires_grad_()

    def f(m, b, lam):
        return gn_solve(_sym_param(m), b, lam, coupling=coupling, rtol=1e-13, maxiter=2000)

    assert torch.autograd.gradcheck(f, (m, b, lam), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=fast)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("coupling", ["full", "diagonal"])
def test_implicit_backward_equals_dense_autograd(grid, coupling):
    H, b = random_problem(grid, seed=3)
    w = torch.randn_like(b)
    grads = []
    for solver in ("gn", "dense"):
        m = torch.randn(2, len(grid), len(grid), *grid, generator=torch.Generator().manual_seed(4),
                        dtype=torch.float64, requires_grad=True)
        bb = b.clone().requires_grad_()
        lam = torch.tensor([0.4, 1.7], dtype=torch.float64, requires_grad=True)
        hh = H + _sym_param(m)
        if solver == "gn":
            x = gn_solve(hh, bb, lam, coupling=coupling, rtol=1e-13)
        else:
            x = dense_solve(hh, bb, lam, coupling)
        (x * w).sum().backward()
        grads.append((m.grad, bb.grad, lam.grad))
    for got, ref in zip(*grads):
        torch.testing.assert_close(got, ref, rtol=1e-7, atol=1e-9)


def test_grad_h_is_symmetric_and_diagonal_only_for_diagonal_coupling():
    H, b = random_problem((4, 3))
    for coupling in ("full", "diagonal"):
        hh = H.clone().requires_grad_()
        gn_solve(hh, b, 1.0, coupling=coupling, rtol=1e-12).sum().backward()
        torch.testing.assert_close(hh.grad, hh.grad.transpose(1, 2), rtol=0, atol=0)
        if coupling == "diagonal":
            assert (hh.grad[:, 0, 1] == 0).all()
        else:
            assert (hh.grad[:, 0, 1] != 0).any()


def test_scalar_lam_grad_is_sum_and_float_lam_has_none():
    H, b = random_problem((4, 4), seed=5)
    lam0 = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    lam1 = torch.tensor([0.8, 0.8], dtype=torch.float64, requires_grad=True)
    gn_solve(H, b, lam0, rtol=1e-12).square().sum().backward()
    gn_solve(H, b, lam1, rtol=1e-12).square().sum().backward()
    assert lam0.grad.shape == ()
    torch.testing.assert_close(lam0.grad, lam1.grad.sum(), rtol=1e-9, atol=0)
    bb = b.clone().requires_grad_()
    gn_solve(H, bb, 0.8, rtol=1e-12).sum().backward()  # float λ: nothing to differentiate, still works
    assert bb.grad is not None


def test_zero_rhs():
    H, _ = random_problem((5, 4))
    hh = H.clone().requires_grad_()
    b = torch.zeros(2, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    lam = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    x, info = gn_solve(hh, b, lam, return_info=True, x0=torch.ones_like(b))
    assert torch.equal(x, torch.zeros_like(x))
    assert (info.iterations == 0).all() and (info.rel_residual == 0).all()
    (x * torch.randn_like(x)).sum().backward()
    assert torch.equal(hh.grad, torch.zeros_like(hh))  # H̄ = −sym(y xᵀ) = 0 at x = 0
    assert torch.equal(lam.grad, torch.zeros_like(lam))
    assert torch.isfinite(b.grad).all()
    # zero upstream gradient: every gradient is zero, no NaN
    hh.grad = b.grad = lam.grad = None
    x = gn_solve(hh, b, lam)
    (x * 0).sum().backward()
    for t in (hh.grad, b.grad, lam.grad):
        assert torch.equal(t, torch.zeros_like(t))


def test_x0():
    H, b = random_problem((6, 5), seed=6)
    exact = dense_solve(H, b, 1.0)
    x, info = gn_solve(H, b, 1.0, x0=exact, rtol=1e-6, return_info=True)
    assert (info.iterations == 0).all()
    torch.testing.assert_close(x, exact, rtol=0, atol=1e-12)
    x2 = gn_solve(H, b, 1.0, x0=torch.randn_like(b), rtol=1e-13)
    torch.testing.assert_close(x2, exact, rtol=0, atol=1e-8)


def test_preconditioner_reduces_iterations_on_badly_scaled_h():
    g = torch.Generator().manual_seed(8)
    grid = (16, 14, 12)
    n = 3
    scale = 10 ** (4 * torch.rand(1, 1, 1, *grid, generator=g, dtype=torch.float64) - 2)  # 1e-2 .. 1e2
    m = torch.randn(1, n, n, *grid, generator=g, dtype=torch.float64)
    H = torch.einsum("bik...,bjk...->bij...", m, m) * scale
    b = torch.randn(1, n, *grid, generator=g, dtype=torch.float64)
    _, plain = gn_solve(H, b, 0.05, rtol=1e-6, precondition=False, return_info=True)
    _, pre = gn_solve(H, b, 0.05, rtol=1e-6, precondition=True, return_info=True)
    assert plain.converged.all() and pre.converged.all()
    assert pre.iterations.item() < 0.5 * plain.iterations.item()


def test_nonconvergence_strict_and_warning(caplog):
    H, b = random_problem((8, 8), seed=9)
    with pytest.raises(RuntimeError, match="did not reach rtol"):
        gn_solve(H, b, 10.0, rtol=1e-10, maxiter=2, strict=True)
    with caplog.at_level(logging.WARNING, logger="layers.gn_solve"):
        x, info = gn_solve(H, b, 10.0, rtol=1e-10, maxiter=2, return_info=True)
    assert "did not reach rtol" in caplog.text
    assert not info.converged.any() and (info.iterations == 2).all()
    assert torch.isfinite(x).all()


# ------------------------------------------------------------------------------------------- validation


def _bad_inputs():
    H, b = random_problem((4, 5))
    f32 = dict(H=H.float(), b=b.float(), lam=1.0)
    nonsym = H.clone()
    nonsym[0, 0, 1, 2, 3] += 1e-3
    nan_h, nan_b = H.clone(), b.clone()
    nan_h[0, 0, 0, 0, 0] = float("nan")
    nan_b[1, 1, 1, 1] = float("inf")
    ok = dict(H=H, b=b, lam=1.0)
    return [
        ("H", dict(ok, H=H[:, :, :, 0])),  # wrong rank
        ("H", dict(ok, H=H[:, :1])),  # (B, 1, 2, *G)
        ("H", dict(ok, H=H.int())),
        ("H", dict(ok, H=nonsym)),
        ("H", dict(ok, H=nan_h)),
        ("b", dict(ok, b=b[:1])),  # batch mismatch: no broadcasting
        ("b", dict(ok, b=b[:, :, :3])),
        ("b", dict(ok, b=b.float())),
        ("b", dict(ok, b=nan_b)),
        ("b", dict(f32, b=b)),
        ("lam", dict(ok, lam=0.0)),
        ("lam", dict(ok, lam=-1.0)),
        ("lam", dict(ok, lam=float("nan"))),
        ("lam", dict(ok, lam=torch.tensor([1.0, -1.0], dtype=torch.float64))),
        ("lam", dict(ok, lam=torch.tensor([1.0, float("inf")], dtype=torch.float64))),
        ("lam", dict(ok, lam=torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64))),
        ("lam", dict(ok, lam=torch.ones(2, 1, dtype=torch.float64))),
        ("lam", dict(ok, lam=torch.tensor(1.0))),  # float32 λ with float64 H
        ("lam", dict(ok, lam="1")),
        ("x0", dict(ok, x0=torch.zeros(2, 2, 4, 4, dtype=torch.float64))),
        ("x0", dict(ok, x0=torch.zeros(2, 2, 4, 5))),
        ("x0", dict(ok, x0=torch.zeros(2, 2, 4, 5, dtype=torch.float64, device="meta"))),  # device
        ("b", dict(ok, b=b.to("meta"))),
        ("lam", dict(ok, lam=torch.ones(2, dtype=torch.float64, device="meta"))),
        ("coupling", dict(ok, coupling="block")),
        ("backend", dict(ok, backend="scipy")),
        ("backend", dict(ok, backend="cupy")),  # CPU tensors
        ("rtol", dict(ok, rtol=0.0)),
        ("maxiter", dict(ok, maxiter=0)),
        ("eps", dict(ok, eps=-1.0)),
    ]


@pytest.mark.parametrize("name,kwargs", _bad_inputs())
def test_bad_inputs_raise_value_error_naming_the_argument(name, kwargs):
    kwargs = dict(kwargs)
    H, b, lam = kwargs.pop("H"), kwargs.pop("b"), kwargs.pop("lam")
    with pytest.raises(ValueError, match=rf"^{name}\b"):  # the message starts with the argument's name
        gn_solve(H, b, lam, **kwargs)


def test_slightly_asymmetric_float32_h_is_accepted():
    H, b = random_problem((4, 5), dtype=torch.float32)
    H[0, 0, 1] += 1e-7 * H.abs().max()
    gn_solve(H, b, 1.0)


# ------------------------------------------------------------------------------------------------ cupy


def _scipy_cg_like_cupy(A, b, *, M=None, x0=None, rtol=1e-3, maxiter=1000):
    """Stand-in for :func:`layers.cupy_backend.cg_cupy` on the CPU: the same CSR tensors, solved by SciPy's CG."""
    import scipy.sparse as sp
    import scipy.sparse.linalg as spla

    def to_scipy(t):
        return sp.csr_matrix((t.values().numpy(), t.col_indices().numpy(), t.crow_indices().numpy()),
                             shape=tuple(t.shape))

    a = to_scipy(A)
    bn = b.numpy()
    if not bn.any():
        return torch.zeros_like(b), 0, 0.0, True
    count = []
    x, info = spla.cg(a, bn, x0=None if x0 is None else x0.numpy(), rtol=rtol, atol=0.0, maxiter=maxiter,
                      M=None if M is None else to_scipy(M), callback=count.append)
    res = float(((bn - a @ x) ** 2).sum() ** 0.5 / (bn**2).sum() ** 0.5)
    return torch.from_numpy(x), len(count), res, info == 0


@pytest.mark.parametrize("coupling", ["full", "diagonal"])
@pytest.mark.parametrize("precondition", [True, False])
def test_cupy_code_path_with_scipy_stand_in(monkeypatch, coupling, precondition):
    """Everything of the cupy backend but cupy itself: CSR assembly of A and of the block-Jacobi
    preconditioner, per-item loop, info and backward, with SciPy's CG in place of cupyx's."""
    gs = importlib.import_module("layers.gn_solve")  # the module (``layers.gn_solve`` is the function)
    monkeypatch.setattr(gs, "cg_cupy", _scipy_cg_like_cupy)
    H, b = random_problem((3, 4, 5), seed=13)
    lam = torch.tensor([0.3, 2.5], dtype=torch.float64, requires_grad=True)
    hh, bb = H.clone().requires_grad_(), b.clone().requires_grad_()
    w = torch.randn_like(b)
    cfg = gs._Config(n=3, coupling=coupling, backend="cupy", rtol=1e-12, maxiter=1000,
                     precondition=precondition, eps=EPS, strict=True)
    x, iters, rel, conv = gs._GNSolveFn.apply(hh, bb, lam, None, cfg)
    assert conv.all() and (rel <= 1e-11).all() and (iters > 0).all()
    grads = torch.autograd.grad((x * w).sum(), (hh, bb, lam))
    ref_x = gn_solve(H, b, lam.detach(), coupling=coupling, backend="torch", rtol=1e-12)
    torch.testing.assert_close(x, ref_x, rtol=0, atol=1e-9)
    ref = [t.clone().requires_grad_() for t in (H, b, lam.detach())]
    ref_grads = torch.autograd.grad((gn_solve(*ref, coupling=coupling, rtol=1e-12) * w).sum(), ref)
    for got, exp in zip(grads, ref_grads):
        torch.testing.assert_close(got, exp, rtol=1e-7, atol=1e-9)


@pytest.mark.gpu
@pytest.mark.parametrize("coupling", ["full", "diagonal"])
def test_torch_backend_on_cuda_matches_cpu(coupling):
    if not torch.cuda.is_available():
        pytest.skip("CUDA unavailable")
    H, b = random_problem((3, 4, 5), seed=10)
    lam = torch.tensor([0.3, 2.5], dtype=torch.float64)
    x_cpu, info_cpu = gn_solve(H, b, lam, coupling=coupling, backend="torch", rtol=1e-12, return_info=True)
    x_gpu, info_gpu = gn_solve(H.cuda(), b.cuda(), lam.cuda(), coupling=coupling, backend="torch", rtol=1e-12,
                               return_info=True)
    assert info_gpu.backend == "torch" and info_gpu.converged.all()
    torch.testing.assert_close(x_gpu.cpu(), x_cpu, rtol=0, atol=1e-9)
    assert (info_gpu.iterations.cpu() - info_cpu.iterations).abs().max() <= 2


@pytest.mark.gpu
@pytest.mark.parametrize("coupling", ["full", "diagonal"])
@pytest.mark.parametrize("grid", GRIDS)
def test_cupy_backend_matches_torch(coupling, grid):
    if not torch.cuda.is_available():
        pytest.skip("CUDA unavailable")
    if not cupy_available():
        pytest.skip("cupy (with cupyx.scipy.sparse.linalg) unavailable")
    H, b = random_problem(grid, seed=11)
    H, b = H.cuda().requires_grad_(), b.cuda().requires_grad_()
    lam = torch.tensor([0.3, 2.5], dtype=torch.float64, device="cuda", requires_grad=True)
    w = torch.randn_like(b)
    out = {}
    for backend in ("torch", "cupy"):
        x, info = gn_solve(H, b, lam, coupling=coupling, backend=backend, rtol=1e-12, return_info=True)
        assert info.backend == backend and info.converged.all()
        grads = torch.autograd.grad((x * w).sum(), (H, b, lam))
        out[backend] = (x, *grads)
    for got, ref in zip(out["cupy"], out["torch"]):
        torch.testing.assert_close(got, ref, rtol=1e-7, atol=1e-9)
    x_auto, info = gn_solve(H, b, lam, coupling=coupling, return_info=True)
    assert info.backend == "graph"  # auto on CUDA: the fastest measured (layers.gn_solve._resolve_backend)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("coupling", ["full", "diagonal"])
def test_graph_backend_equals_torch_backend(device, coupling):
    """The graph backend runs the torch backend's PCG (as CUDA graphs on CUDA, eagerly elsewhere): the same
    iteration counts, solutions and implicit gradients (float64), also on a second call that reuses the cached
    solver with other numbers and a warm start."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA unavailable")
    from layers.gn_operator import clear_graph_cache

    clear_graph_cache()
    for seed in (12, 13):
        H, b = random_problem((6, 5, 7), seed=seed)
        H, b = H.to(device).requires_grad_(), b.to(device).requires_grad_()
        lam = torch.tensor([0.3, 2.5], dtype=torch.float64, device=device, requires_grad=True)
        x0 = torch.full_like(b, 0.1) if seed == 13 else None
        w = torch.randn(b.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).to(device)
        out = {}
        for backend in ("torch", "graph"):
            x, info = gn_solve(H, b, lam, coupling=coupling, backend=backend, rtol=1e-10, x0=x0, return_info=True)
            assert info.backend == backend and info.converged.all()
            out[backend] = (x, info.iterations, *torch.autograd.grad((x * w).sum(), (H, b, lam)))
        assert torch.equal(out["graph"][1], out["torch"][1])
        for got, ref in zip(out["graph"], out["torch"]):
            scale = float(ref.abs().max())
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-12 * max(scale, 1.0))
