"""GPU: one LearnGN training step (forward + backward through the GN iterations and their implicit-gradient
solves) gives the same loss and gradients on CUDA, with each solver backend, as on the CPU (float64).

Marked ``gpu``: skips cleanly without CUDA (and, for the cupy backend, without cupy). The CPU half of the
comparison is the reference, so these tests need nothing but a GPU to run.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from data.collate import collate_pairs
from data.synthetic import SyntheticPairs
from layers.cupy_backend import cupy_available
from lightning_modules.learngn import LearnGN

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore")]

gn_module = importlib.import_module("layers.gn")
REAL_SOLVE = importlib.import_module("layers.gn_solve").gn_solve  # never patched

#: Every solve to a relative residual of 1e-12 (float64), so that the CPU and GPU runs differ only by rounding
#: and by that residual amplified by the conditioning of the GN systems (λ ≥ 0.03 here).
RTOL_SOLVE = 1e-12


def _require(backend: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("CUDA unavailable")
    if backend == "cupy" and not cupy_available():
        pytest.skip("cupy (with cupyx.scipy.sparse.linalg) unavailable")


def _batch(device: str) -> dict:
    ds = SyntheticPairs(2, seed=5, shape=(48, 40), num_keypoints=16)
    batch = collate_pairs([ds[0], ds[1]])
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            v = v.to(device, torch.float64) if v.is_floating_point() else v.to(device)
        out[k] = v
    return out


def training_step(device: str, backend: str, monkeypatch) -> tuple[torch.Tensor, dict[str, torch.Tensor], set]:
    """Loss, parameter gradients (on the CPU) and the solver backends that ran, for one float64 training step
    of a small LearnGN (MIND features, nonlinear heads, label + keypoint + regularity losses)."""
    backends = set()

    def recording_solve(*args, **kwargs):
        x, info = REAL_SOLVE(*args, return_info=True, **kwargs)
        backends.add(info.backend)
        return x

    monkeypatch.setattr(gn_module, "gn_solve", recording_solve)
    torch.manual_seed(0)
    model = LearnGN(spatial_dims=2, features="mind", iterations=3, stride=4, lam_start=0.3, lam_end=0.03, hidden=4,
                    w_keypoint=0.1, w_reg=0.1, rtol=RTOL_SOLVE, maxiter=5000).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # away from the handcrafted initialisation, so that every weight gets a gradient
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    model.gn.solver["backend"] = backend
    model.to(device)
    batch = _batch(device)
    loss = sum(model.loss_terms(batch, model.register(batch)).values())
    loss.backward()
    grads = {name: p.grad.detach().cpu() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach().cpu(), grads, backends


@pytest.mark.parametrize("backend", ["torch", "graph", "cupy"])
def test_training_step_on_cuda_matches_cpu(backend, monkeypatch):
    _require(backend)
    ref_loss, ref_grads, ref_backends = training_step("cpu", "torch", monkeypatch)
    loss, grads, backends = training_step("cuda", backend, monkeypatch)
    assert ref_backends == {"torch"} and backends == {backend}
    assert float(ref_loss) > 0 and ref_grads and all(float(g.abs().max()) > 0 for g in ref_grads.values())
    # float64 on both devices, every solve to a relative residual of 1e-12: on the CPU, loosening that to 1e-10
    # moves the loss by 1e-11 and the gradients by at most 2e-10 relative (the GN systems amplify solver error
    # little), so CPU and GPU should agree to ~1e-12; 1e-7 leaves a wide margin for rounding while any real
    # difference (a float32 step, a wrong backward of the cupy path, a missing term) shows at 1e-3 or more
    torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=0)
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, rtol=1e-7, atol=1e-9 * float(ref.abs().max()), msg=name)
