"""λ of every LearnGN variant lives in ``gn.lam`` (docs/design.md §5), with the values, fields and λ gradients of
the earlier per-class parametrisations (float64, 1e-12), and checkpoints written with the earlier keys
(``log_lam``, ``bilevel_log_lam``, ``lam_net.*``, ``log_lam_eval``) load into it with the same registration."""

from __future__ import annotations

import math

import pytest
import torch

from data.checkpoint import LEGACY_LAM_KEYS, model_from_checkpoint
from data.collate import collate_pairs
from data.synthetic import SyntheticPairs
from layers.lam_schedule import geometric_schedule
from layers.optim import FourierSchedule
from lightning_modules.hyper import BilevelLearnGN, HyperLearnGN, current_lambda, resolve_lambda
from lightning_modules.learngn import LearnGN

pytestmark = pytest.mark.filterwarnings("ignore")

GN = {"features": "intensity", "iterations": 4, "stride": 4, "lam_start": 0.003, "lam_end": 0.0015,
      "label_loss": "mse", "w_reg": 0.5, "rtol": 1e-10, "maxiter": 2000}
VARIANTS = ("fixed", "learned", "scalar", "per_iteration", "fourier", "hyper")
OLD_KEY = {"learned": "log_lam", "scalar": "bilevel_log_lam", "per_iteration": "bilevel_log_lam",
           "fourier": "lam_net.", "hyper": "log_lam_eval"}


def _model(variant: str) -> LearnGN:
    torch.manual_seed(0)
    if variant in ("fixed", "learned"):
        return LearnGN(learn_schedule=variant == "learned", **GN)
    if variant == "hyper":
        return HyperLearnGN(lam_min=3e-4, lam_max=3e-2, lam_eval=0.002, **GN)
    return BilevelLearnGN(lam_mode=variant, lam_init=0.004, **GN)


def _earlier_values(variant: str) -> torch.Tensor:
    """λ ``(K,)`` as each class computed it before λ had one home (float32 state, as those classes held it)."""
    ref = torch.tensor(geometric_schedule(0.003, 0.0015, 4))
    ratio64 = ref.double() / ref.double()[0]
    if variant == "fixed":
        return ref
    if variant == "learned":
        return ref.clone().log().exp()
    if variant == "scalar":
        return torch.tensor([math.log(0.004)]).exp() * ratio64.float()
    if variant == "per_iteration":
        return (0.004 * ratio64).log().float().exp()
    if variant == "hyper":
        return torch.tensor(math.log(0.002)).exp() * ratio64.float()
    return FourierSchedule(0.004 * ratio64, n_freq=2, hidden=16).values().float()


@pytest.fixture(scope="module")
def batch() -> dict:
    ds = SyntheticPairs(2, seed=0, shape=(32, 32), noise=0.1, stream=3)
    return collate_pairs([ds[i] for i in range(2)])


def _double(batch: dict) -> dict:
    return {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in batch.items()}


@pytest.mark.parametrize("variant", VARIANTS)
def test_values_fields_and_lambda_gradients_match_the_earlier_parametrisations(batch, variant):
    model = _model(variant)
    torch.testing.assert_close(model.lam_values().detach(), _earlier_values(variant), rtol=0, atol=0)
    model = model.double()
    b64 = _double(batch)
    u = model.register(b64)
    lam = model.lam_values().detach().double().clone().requires_grad_(True)
    v = model.run(b64, lam=lam).disp
    torch.testing.assert_close(u, v, rtol=0, atol=1e-12)
    (g_lam,) = torch.autograd.grad(v.pow(2).mean(), lam)
    params = list(model.gn.lam.parameters())
    if variant in ("learned", "per_iteration", "scalar"):  # λ = exp(log_lam) (· r_t): chain rule through exp
        (g,) = torch.autograd.grad(u.pow(2).mean(), params)
        expected = g_lam * lam.detach() if variant != "scalar" else (g_lam * lam.detach()).sum().reshape(1)
        torch.testing.assert_close(g, expected, rtol=1e-10, atol=1e-14)
    # eval.py --lam (resolve_lambda) rescales every variant, the shape kept
    shape = model.lam_values().detach().double() / current_lambda(model)
    resolve_lambda(model, 2 * current_lambda(model))
    torch.testing.assert_close(model.lam_values().detach().double() / current_lambda(model), shape)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "fixed"])
def test_checkpoints_with_the_earlier_lambda_keys_load_with_the_same_registration(tmp_path, batch, variant):
    model = _model(variant)
    with torch.no_grad():
        for p in model.gn.lam.parameters():
            p.add_(0.01 * torch.arange(p.numel(), dtype=p.dtype).reshape(p.shape))
        if variant == "hyper":
            model.set_lambda(0.01)
        u = model.register(batch)
    new, old = next((k, v) for k, v in LEGACY_LAM_KEYS.items() if k == OLD_KEY[variant])[::-1]
    state = {(old + k[len(new):] if k.startswith(new) else k): t for k, t in model.state_dict().items()}
    assert any(k.startswith(OLD_KEY[variant]) for k in state) and not any(k.startswith("gn.lam.") for k in state)
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": dict(model.hparams),
                "model_class": f"{type(model).__module__}.{type(model).__qualname__}"}, path)
    loaded, _ = model_from_checkpoint(path, base=LearnGN)
    with torch.no_grad():
        torch.testing.assert_close(loaded.register(batch), u, rtol=0, atol=0)
