"""Grid Laplacian: stencil, CSR and system assembly against a dense matrix built by explicit edge loops."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from layers.cupy_backend import cupy_available, laplacian_csr_cupy
from layers.laplacian import (
    adjacency_apply_,
    assemble_system_csr,
    laplacian_apply,
    laplacian_csr,
    laplacian_degree,
)

SHAPES = [(5, 4), (3, 4, 5), (1, 6), (2, 1, 3)]


def _ravel(p: tuple[int, ...], shape: tuple[int, ...]) -> int:
    idx = 0
    for k, s in zip(p, shape):
        idx = idx * s + k
    return idx


def dense_laplacian(shape: tuple[int, ...]) -> torch.Tensor:
    """Dense free-boundary grid Laplacian, by looping over nodes and their +1 neighbours (float64)."""
    n_nodes = math.prod(shape)
    lap = torch.zeros(n_nodes, n_nodes, dtype=torch.float64)
    for p in itertools.product(*(range(s) for s in shape)):
        for d in range(len(shape)):
            if p[d] + 1 < shape[d]:
                q = list(p)
                q[d] += 1
                i, j = _ravel(p, shape), _ravel(tuple(q), shape)
                lap[i, j] -= 1
                lap[j, i] -= 1
                lap[i, i] += 1
                lap[j, j] += 1
    return lap


def dense_system(H: torch.Tensor, lam: float, eps: float, diagonal: bool = False) -> torch.Tensor:
    """Dense ``blockdiag(H) + λ L⊗I + εI`` of one item ``H`` ``(c, c, *G)``, unknown ``i*N + p``, by loops."""
    c = H.shape[0]
    shape = tuple(H.shape[2:])
    n_nodes = math.prod(shape)
    lap = dense_laplacian(shape)
    a = torch.zeros(c * n_nodes, c * n_nodes, dtype=torch.float64)
    hf = H.reshape(c, c, n_nodes).double()
    for i in range(c):
        a[i * n_nodes:(i + 1) * n_nodes, i * n_nodes:(i + 1) * n_nodes] = lam * lap
        for j in range(c):
            if diagonal and i != j:
                continue
            for p in range(n_nodes):
                a[i * n_nodes + p, j * n_nodes + p] += hf[i, j, p]
    return a + eps * torch.eye(c * n_nodes, dtype=torch.float64)


def test_dense_reference_sanity():
    lap = dense_laplacian((5, 4))
    assert torch.equal(lap, lap.T)
    assert torch.allclose(lap.sum(1), torch.zeros(20, dtype=torch.float64))
    # corners have 2 neighbours, edges 3, interior 4
    assert sorted(set(lap.diagonal().tolist())) == [2.0, 3.0, 4.0]


@pytest.mark.parametrize("shape", SHAPES)
def test_stencil_matches_dense(shape):
    torch.manual_seed(0)
    x = torch.randn(2, 3, *shape, dtype=torch.float64)
    ref = (dense_laplacian(shape) @ x.reshape(6, -1).T).T.reshape(x.shape)
    torch.testing.assert_close(laplacian_apply(x), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_csr_matches_dense(shape):
    csr = laplacian_csr(shape, "cpu", torch.float64)
    assert csr.layout == torch.sparse_csr
    assert csr.crow_indices().dtype == torch.int32 and csr.col_indices().dtype == torch.int32
    torch.testing.assert_close(csr.to_dense(), dense_laplacian(shape), rtol=0, atol=0)
    # cached per (shape, device, dtype)
    assert laplacian_csr(shape, "cpu", torch.float64) is csr
    assert laplacian_csr(shape, "cpu", torch.float32) is not csr


@pytest.mark.parametrize("shape", SHAPES)
def test_degree_and_adjacency(shape):
    torch.manual_seed(1)
    x = torch.randn(2, 2, *shape, dtype=torch.float64)
    deg = laplacian_degree(shape, "cpu", torch.float64)
    torch.testing.assert_close(deg.reshape(-1), dense_laplacian(shape).diagonal(), rtol=0, atol=0)
    out = x * deg  # deg·x − S x = L x
    adjacency_apply_(out, x)
    torch.testing.assert_close(out, laplacian_apply(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(5, 4), (3, 4, 5)])
@pytest.mark.parametrize("coupling", ["full", "diagonal"])
def test_assemble_system_csr(shape, coupling):
    torch.manual_seed(2)
    n = len(shape)
    m = torch.randn(n, n, *shape, dtype=torch.float64)
    H = torch.einsum("ik...,jk...->ij...", m, m)
    a = assemble_system_csr(H, 0.7, coupling, eps=1e-3)
    ref = dense_system(H, 0.7, 1e-3, diagonal=coupling == "diagonal")
    torch.testing.assert_close(a.to_dense(), ref, rtol=0, atol=1e-12)
    # a tensor λ gives the same matrix
    a2 = assemble_system_csr(H, torch.tensor(0.7, dtype=torch.float64), coupling, eps=1e-3)
    torch.testing.assert_close(a2.to_dense(), ref, rtol=0, atol=1e-12)


def test_stencil_input_validation():
    with pytest.raises(ValueError, match="x must have shape"):
        laplacian_apply(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="shape"):
        laplacian_csr((4,))


@pytest.mark.gpu
def test_cupy_csr_zero_copy():
    if not torch.cuda.is_available():
        pytest.skip("CUDA unavailable")
    if not cupy_available():
        pytest.skip("cupy (with cupyx.scipy.sparse.linalg) unavailable")
    import cupy

    shape = (3, 4, 5)
    a_t = laplacian_csr(shape, "cuda", torch.float64)
    a_c = laplacian_csr_cupy(shape, "cuda", torch.float64)
    assert a_c.data.data.ptr == a_t.values().data_ptr()  # shares memory (DLPack, no copy)
    x = cupy.random.standard_normal(a_c.shape[0])
    ref = dense_laplacian(shape).cuda() @ torch.from_dlpack(x)
    torch.testing.assert_close(torch.from_dlpack(a_c @ x), ref, rtol=0, atol=1e-12)
