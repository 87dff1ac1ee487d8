"""The cupy backend of the GN solve: the one module that imports cupy (docs/design.md §3).

Everything that touches cupy lives here, behind lazy imports (cupy is optional):

* :func:`cupy_available` — whether the backend can run (cupy, ``cupyx.scipy.sparse.linalg`` and a GPU);
* :func:`torch_to_cupy`, :func:`csr_to_cupy` — zero-copy DLPack hand-over of dense tensors and of torch sparse
  CSR tensors to cupy arrays / ``cupyx.scipy.sparse.csr_matrix``;
* :func:`laplacian_csr_cupy` — the grid Laplacian (:func:`layers.laplacian.laplacian_csr`) as a cupy matrix;
* :func:`cg_cupy` — ``cupyx.scipy.sparse.linalg.cg`` on one CSR system, on torch's current CUDA stream.

The CSR matrices themselves are assembled in torch (:mod:`layers.laplacian`); the batched torch PCG that the
``"torch"`` backend uses is :func:`layers.cg.cg`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from collections.abc import Sequence

import torch

from .laplacian import laplacian_csr

__all__ = ["cg_cupy", "csr_to_cupy", "cupy_available", "laplacian_csr_cupy", "torch_to_cupy"]

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- availability


@functools.lru_cache(maxsize=1)
def _cupy_modules():
    """``(cupy, cupyx.scipy.sparse, cupyx.scipy.sparse.linalg)`` or ``None`` when they cannot be used."""
    try:
        import cupy
        import cupyx.scipy.sparse as cpx_sparse
        import cupyx.scipy.sparse.linalg as cpx_linalg
    except ImportError as err:  # not installed, or installed without a usable CUDA toolkit
        logger.debug("cupy unavailable: %s", err)
        return None
    except Exception as err:  # noqa: BLE001  (a broken CUDA install can raise anything on import)
        logger.debug("cupy import failed: %s", err)
        return None
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
    except Exception as err:  # noqa: BLE001  (CUDARuntimeError without a driver/GPU)
        logger.debug("cupy has no usable GPU: %s", err)
        return None
    return cupy, cpx_sparse, cpx_linalg


def cupy_available() -> bool:
    """Whether the cupy backend can run: cupy and ``cupyx.scipy.sparse.linalg`` import and a GPU is visible.

    ``import cupy`` alone can succeed on machines without a GPU; this checks more. The answer is cached.
    """
    return _cupy_modules() is not None and torch.cuda.is_available()


# ------------------------------------------------------------------------------------------ DLPack hand-over


def _import_cupy_sparse():
    """Lazy import of ``cupy`` and ``cupyx.scipy.sparse``; ``ImportError`` when unavailable."""
    import cupy
    import cupyx.scipy.sparse as cpx_sparse

    return cupy, cpx_sparse


def torch_to_cupy(t: torch.Tensor):
    """Zero-copy view of a CUDA tensor as a cupy array (DLPack).

    Args:
        t: CUDA tensor of any shape and dtype; it may require grad.

    Returns:
        a cupy array sharing ``t``'s memory (no copy): writes through either are seen by the other, and
        autograd does not see what cupy does with it.

    The export is made from ``t.detach()``, a view of the same storage that does not require grad:
    ``Tensor.__dlpack__`` refuses tensors that require grad (``BufferError``), and inside the GN solve's
    autograd function the right-hand side ``b`` (and views of it) still require grad. Gradients are not lost:
    the solve's backward is implicit (docs/design.md §3) and never differentiates through cupy.
    """
    import cupy

    t = t.detach()
    if hasattr(cupy, "from_dlpack"):
        return cupy.from_dlpack(t)
    return cupy.fromDlpack(torch.utils.dlpack.to_dlpack(t))  # cupy < 10


def csr_to_cupy(a: torch.Tensor):
    """Zero-copy conversion of a CUDA torch sparse CSR tensor to ``cupyx.scipy.sparse.csr_matrix``.

    The cupy matrix shares ``crow_indices``/``col_indices``/``values`` memory with ``a`` through DLPack
    (indices must be int32, as :mod:`layers.laplacian` produces them; ``a`` may require grad, see
    :func:`torch_to_cupy`). Requires cupy; raises ``ImportError`` otherwise.
    """
    _, cpx_sparse = _import_cupy_sparse()
    if a.layout != torch.sparse_csr:
        raise ValueError(f"a must be a sparse CSR tensor; got layout {a.layout}")
    if a.crow_indices().dtype != torch.int32:
        raise ValueError("a must have int32 indices for cupy")
    data = torch_to_cupy(a.values())
    indices = torch_to_cupy(a.col_indices())
    indptr = torch_to_cupy(a.crow_indices())
    return cpx_sparse.csr_matrix((data, indices, indptr), shape=tuple(a.shape), copy=False)


def laplacian_csr_cupy(shape: Sequence[int], device: torch.device | str, dtype: torch.dtype = torch.float32):
    """The grid Laplacian as a ``cupyx.scipy.sparse.csr_matrix`` on a CUDA ``device``.

    A zero-copy DLPack view of the cached :func:`layers.laplacian.laplacian_csr` tensor (do not modify it).
    cupy is imported lazily; raises ``ImportError`` when it is not installed.
    """
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"device must be a CUDA device for cupy; got {device}")
    return csr_to_cupy(laplacian_csr(shape, device, dtype))


# ------------------------------------------------------------------------------------------------ the solve


def cg_cupy(
    A: torch.Tensor,
    b: torch.Tensor,
    *,
    M: torch.Tensor | None = None,
    x0: torch.Tensor | None = None,
    rtol: float = 1e-3,
    maxiter: int = 1000,
) -> tuple[torch.Tensor, int, float, bool]:
    """Solve one SPD system ``A x = b`` with ``cupyx.scipy.sparse.linalg.cg`` on the GPU.

    Args:
        A: ``(m, m)`` torch sparse CSR tensor on a CUDA device, int32 indices (e.g. from
            :func:`layers.laplacian.system_csr_from_blocks`).
        b: ``(m,)`` dense CUDA tensor, dtype of ``A`` (float32 or float64).
        M: optional ``(m, m)`` CSR preconditioner ``≈ A⁻¹`` (e.g. the inverted block-Jacobi blocks).
        x0: optional ``(m,)`` initial guess.
        rtol: relative tolerance ``‖b − A x‖ ≤ rtol ‖b‖``.
        maxiter: maximum number of iterations.

    Returns:
        ``(x, iterations, rel_residual, converged)``: ``x`` ``(m,)`` a torch tensor sharing memory with
        cupy's result (DLPack, no copy), the number of CG iterations (counted by callback), the relative
        residual recomputed from ``x`` after the solve, and whether cupy reported convergence.

    Raises:
        RuntimeError: when cupy is not available (see :func:`cupy_available`).
    """
    mods = _cupy_modules()
    if mods is None:
        raise RuntimeError("the cupy backend needs cupy with cupyx.scipy.sparse.linalg and a CUDA GPU")
    cupy, _, cpx_linalg = mods

    stream_context = _cupy_stream(cupy, b.device)  # raises for a non-CUDA b
    b = b.detach().contiguous()  # not differentiable here (gn_solve differentiates implicitly)
    bnorm = float(torch.linalg.vector_norm(b))
    if bnorm == 0.0:
        return torch.zeros_like(b), 0, 0.0, True
    count = [0]

    def callback(_xk) -> None:
        count[0] += 1

    with stream_context:
        a_cp = csr_to_cupy(A)
        m_cp = csr_to_cupy(M) if M is not None else None
        b_cp = torch_to_cupy(b)
        x0_cp = torch_to_cupy(x0.detach().contiguous()) if x0 is not None else None
        kwargs = {_cupy_tol_keyword(cpx_linalg.cg): rtol}
        x_cp, info = cpx_linalg.cg(
            a_cp, b_cp, x0=x0_cp, maxiter=maxiter, M=m_cp, callback=callback, atol=0.0, **kwargs
        )
        res = float(cupy.linalg.norm(b_cp - a_cp @ x_cp)) / bnorm
        x = torch.from_dlpack(x_cp)
    return x, count[0], res, info == 0


@functools.lru_cache(maxsize=4)
def _cupy_tol_keyword(cg_fn) -> str:
    """``"rtol"`` for cupy versions that renamed ``tol`` (following SciPy ≥ 1.12), else ``"tol"``."""
    try:
        params = inspect.signature(cg_fn).parameters
    except (TypeError, ValueError):
        return "tol"
    return "rtol" if "rtol" in params else "tol"


def _cupy_stream(cupy, device: torch.device):
    """A context manager that makes cupy work on ``device`` and on torch's current stream there, so that cupy's
    kernels are ordered with torch's (DLPack hands arrays over without copies or extra synchronisation).

    Raises ``ValueError`` at once (not on entering) for a non-CUDA device.
    """
    if device.type != "cuda":
        raise ValueError(f"b must be a CUDA tensor for the cupy backend; got device {device}")
    return _on_torch_stream(cupy, device)


@contextlib.contextmanager
def _on_torch_stream(cupy, device: torch.device):
    stream = torch.cuda.current_stream(device)
    with cupy.cuda.Device(device.index), cupy.cuda.ExternalStream(stream.cuda_stream):
        yield
