"""The cupy glue on the CPU: DLPack export (:func:`layers.cupy_backend.torch_to_cupy`), CSR hand-over
(:func:`layers.cupy_backend.csr_to_cupy`), :func:`layers.cupy_backend.cg_cupy` and the cupy path of ``gn_solve`` with
autograd, run against a stand-in for cupy made of NumPy and SciPy.

The stand-in is faithful where an earlier bug of the GN solve on the GPU lived: ``numpy.from_dlpack`` goes through
the same ``Tensor.__dlpack__`` export as ``cupy.from_dlpack`` and refuses a tensor that requires grad with the same
``BufferError`` (``Tensor.numpy()`` does not: under ``no_grad``, as inside an autograd function, it accepts one,
which is how a NumPy-based stand-in of the whole of ``cg_cupy`` missed it). ``scipy.sparse.csr_matrix`` and
``scipy.sparse.linalg.cg`` take the place of cupyx's (same arguments, ``rtol`` keyword, callback per iteration). The
device and stream context is the only part left out; the real thing runs in the ``gpu`` tests
(``tests/layers/test_gn_solve.py``, ``tests/lightning_modules/test_gpu_training.py``).
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import types

import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.linalg
import torch

from layers import gn_solve
from layers.cupy_backend import csr_to_cupy, torch_to_cupy
from layers.laplacian import laplacian_csr, laplacian_degree, system_csr_from_blocks

from .test_gn_solve import EPS, GRIDS, random_problem

cg_module = importlib.import_module("layers.cupy_backend")
gs = importlib.import_module("layers.gn_solve")  # the module (``layers.gn_solve`` is the function)


def _stand_in_modules(exported: list) -> dict[str, types.ModuleType]:
    """``cupy``, ``cupyx.scipy.sparse`` and ``cupyx.scipy.sparse.linalg`` made of NumPy / SciPy; every tensor
    handed to ``from_dlpack`` is appended to ``exported``."""
    cupy = types.ModuleType("cupy")

    def from_dlpack(obj):
        exported.append(obj)
        return np.from_dlpack(obj)

    cupy.from_dlpack = from_dlpack
    # SciPy's array-API detection (SciPy >= 1.15 or so) looks up ``sys.modules["cupy"].ndarray`` on every sparse
    # solve once a module named cupy is loaded: a class that nothing is an instance of
    cupy.ndarray = type("ndarray", (), {})
    cupy.linalg = types.SimpleNamespace(norm=np.linalg.norm)
    cupyx = types.ModuleType("cupyx")
    cpx_scipy = types.ModuleType("cupyx.scipy")
    cpx_sparse = types.ModuleType("cupyx.scipy.sparse")
    cpx_linalg = types.ModuleType("cupyx.scipy.sparse.linalg")
    cpx_sparse.csr_matrix = scipy.sparse.csr_matrix
    cpx_linalg.cg = scipy.sparse.linalg.cg
    cupyx.scipy, cpx_scipy.sparse, cpx_sparse.linalg = cpx_scipy, cpx_sparse, cpx_linalg
    return {"cupy": cupy, "cupyx": cupyx, "cupyx.scipy": cpx_scipy, "cupyx.scipy.sparse": cpx_sparse,
            "cupyx.scipy.sparse.linalg": cpx_linalg}


@pytest.fixture
def stand_in(monkeypatch):
    """Install the stand-in as ``cupy`` / ``cupyx`` for the test; returns the list of exported tensors."""
    exported: list = []
    mods = _stand_in_modules(exported)
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(cg_module, "_cupy_modules",
                        lambda: (mods["cupy"], mods["cupyx.scipy.sparse"], mods["cupyx.scipy.sparse.linalg"]))
    monkeypatch.setattr(cg_module, "_cupy_stream", lambda cupy, device: contextlib.nullcontext())
    return exported


def test_the_stand_in_refuses_what_cupy_refuses():
    t = torch.zeros(3, requires_grad=True)
    with pytest.raises(BufferError, match="require"):
        np.from_dlpack(t)  # what cupy.from_dlpack(t) raised in the GN solve before the DLPack export detached


def test_torch_to_cupy_exports_a_detached_view_without_a_copy(stand_in):
    t = torch.arange(6, dtype=torch.float64).reshape(2, 3).requires_grad_()
    view = t[1]  # a view of a tensor that requires grad requires grad too, even under no_grad
    with torch.no_grad():
        assert view.requires_grad
    arr = torch_to_cupy(view)
    (exported,) = stand_in
    assert not exported.requires_grad
    assert exported.data_ptr() == view.data_ptr()
    assert exported.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()  # same storage
    assert t.requires_grad and view.requires_grad  # the caller's tensors are untouched
    assert arr.ctypes.data == view.data_ptr() and arr.shape == (3,)
    with torch.no_grad():
        t[1, 2] = 42.0
    assert arr[2] == 42.0  # shares memory: no copy


def test_torch_to_cupy_legacy_interface_exports_a_detached_view(monkeypatch):
    """cupy < 10 has ``fromDlpack(capsule)`` only: the capsule is made from the detached view too."""
    exported = []
    legacy = types.ModuleType("cupy")

    def from_capsule(capsule):
        out = torch.utils.dlpack.from_dlpack(capsule)
        exported.append(out)
        return out

    legacy.fromDlpack = from_capsule
    monkeypatch.setitem(sys.modules, "cupy", legacy)
    t = torch.ones(4, dtype=torch.float64, requires_grad=True)
    out = torch_to_cupy(t)
    assert out.data_ptr() == t.data_ptr() and not out.requires_grad and t.requires_grad


def test_csr_to_cupy_shares_the_arrays(stand_in):
    a = laplacian_csr((3, 4), "cpu", torch.float64)
    m = csr_to_cupy(a)
    assert m.data.ctypes.data == a.values().data_ptr()
    assert m.indices.ctypes.data == a.col_indices().data_ptr()
    assert m.indptr.ctypes.data == a.crow_indices().data_ptr()
    x = np.random.default_rng(0).standard_normal(12)
    np.testing.assert_allclose(m @ x, (a.to_dense() @ torch.from_numpy(x)).numpy(), rtol=0, atol=1e-12)


def test_csr_to_cupy_accepts_values_that_require_grad(stand_in):
    hd = torch.rand(2, 2, 3, 4, dtype=torch.float64) + 4.0
    hd = (hd + hd.transpose(0, 1)).requires_grad_()
    a = system_csr_from_blocks(hd, 0.5)  # built with grad enabled: its values require grad
    assert a.requires_grad
    m = csr_to_cupy(a)
    assert all(not t.requires_grad for t in stand_in)
    np.testing.assert_array_equal(m.toarray(), a.detach().to_dense().numpy())


def test_cg_cupy_matches_the_torch_cg(stand_in):
    H, b = random_problem((4, 5), bsz=1, seed=3)
    a = system_csr_from_blocks(
        H[0] + torch.eye(2, dtype=H.dtype).view(2, 2, 1, 1) * (0.7 * laplacian_degree((4, 5)) + EPS), 0.7)
    rhs = b[0].reshape(-1).clone().requires_grad_()
    x, iters, rel, conv = cg_module.cg_cupy(a, rhs, rtol=1e-12, maxiter=500)
    assert conv and 0 < iters <= 40 and rel <= 1e-11
    assert not x.requires_grad
    ref = torch.linalg.solve(a.to_dense(), rhs.detach())
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-9)
    # zero right-hand side: zeros, no iteration
    x0, iters0, rel0, conv0 = cg_module.cg_cupy(a, torch.zeros_like(rhs), rtol=1e-12)
    assert conv0 and iters0 == 0 and rel0 == 0.0 and not x0.any()


def test_cg_cupy_refuses_cpu_tensors_without_the_stand_in(monkeypatch):
    monkeypatch.setattr(cg_module, "_cupy_modules", lambda: (types.SimpleNamespace(), None, None))
    a = laplacian_csr((2, 2), "cpu", torch.float64)
    with pytest.raises(ValueError, match="CUDA"):
        cg_module.cg_cupy(a, torch.ones(4, dtype=torch.float64))


@pytest.mark.parametrize("coupling", ["full", "diagonal"])
@pytest.mark.parametrize("grid", GRIDS)
def test_gn_solve_cupy_path_with_autograd(stand_in, coupling, grid):
    """The cupy path of ``gn_solve`` with inputs that require grad (what every training step does): the same
    solution and gradients as the torch backend (float64, both solved to ``rtol=1e-12``), with every export
    made from a tensor that does not require grad."""
    H, b = random_problem(grid, seed=11)
    lam = torch.tensor([0.3, 2.5], dtype=torch.float64, requires_grad=True)
    hh, bb = H.clone().requires_grad_(), b.clone().requires_grad_()
    w = torch.randn(b.shape, generator=torch.Generator().manual_seed(1), dtype=b.dtype)
    cfg = gs._Config(n=len(grid), coupling=coupling, backend="cupy", rtol=1e-12, maxiter=1000,
                     precondition=True, eps=EPS, strict=True)
    x, iters, rel, conv = gs._GNSolveFn.apply(hh, bb, lam, None, cfg)
    assert conv.all() and (rel <= 1e-11).all() and (iters > 0).all()
    grads = torch.autograd.grad((x * w).sum(), (hh, bb, lam))
    assert stand_in and not any(t.requires_grad for t in stand_in)
    ref = [t.clone().requires_grad_() for t in (H, b, lam.detach())]
    ref_x = gn_solve(*ref, coupling=coupling, backend="torch", rtol=1e-12)
    ref_grads = torch.autograd.grad((ref_x * w).sum(), ref)
    # two float64 solves to a relative residual of 1e-12 on systems with condition numbers below 1e3
    torch.testing.assert_close(x, ref_x.detach(), rtol=0, atol=1e-9)
    for got, exp in zip(grads, ref_grads):
        torch.testing.assert_close(got, exp, rtol=1e-7, atol=1e-9)
