"""LearnGN: an untrained model equals handcrafted GN; bad inputs fail early with clear messages."""

import pytest
import torch

from data.checkpoint import load_init_weights
from data.collate import collate_pairs
from data.synthetic import SyntheticPairs
from lightning_modules.baselines import HandcraftedGN
from lightning_modules.learngn import LearnGN


def _batch(ndim=2, n=2, shape=(64, 64), seed=3):
    ds = SyntheticPairs(n, seed=seed, shape=shape, ndim=ndim)
    return collate_pairs([ds[i] for i in range(n)])


@pytest.mark.parametrize("features,hidden,encoder", [("mind", 0, 0), ("mind", 8, 0), ("mind", 0, 6), ("sdm", 0, 0),
                                                    ("intensity", 0, 0)])
def test_untrained_learngn_equals_handcrafted_gn(features, hidden, encoder):
    batch = _batch()
    ids = [int(v) for v in batch["label_ids"][0]]
    batch = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in batch.items()}
    model = LearnGN(spatial_dims=2, features=features, label_ids=ids, iterations=5, lam_start=0.3,
                    lam_end=0.05, hidden=hidden, encoder_hidden=encoder, rtol=1e-6).double()
    ref = HandcraftedGN(features=features, iterations=5, lam=(0.3, 0.05), solver={"rtol": 1e-6}).double()
    with torch.no_grad():
        u_model = model.register(batch)
        u_ref = ref.register(batch)
    assert u_ref.abs().max() > 1.0  # it moved
    # the same operators computed two ways: equal to float64 rounding (measured ~1e-15)
    torch.testing.assert_close(u_model, u_ref, rtol=0, atol=1e-9)


def test_untrained_learngn_3d_equals_handcrafted_gn():
    batch = _batch(ndim=3, n=1, shape=(32, 32, 32))
    model = LearnGN(spatial_dims=3, features="mind", iterations=3, lam_start=0.3, lam_end=0.1, rtol=1e-6)
    ref = HandcraftedGN(features="mind", iterations=3, lam=(0.3, 0.1), solver={"rtol": 1e-6})
    with torch.no_grad():
        torch.testing.assert_close(model.register(batch), ref.register(batch), rtol=0, atol=1e-5)


def test_gradients_reach_the_heads():
    batch = _batch(n=1)
    model = LearnGN(spatial_dims=2, features="mind", iterations=3, hidden=4)
    u = model.register(batch)
    loss = sum(model.loss_terms(batch, u).values())
    loss.backward()
    grads = [p.grad for p in model.heads.parameters()]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_gradients_reach_the_encoder():
    batch = _batch(n=1)
    model = LearnGN(spatial_dims=2, features="mind", iterations=3, encoder_hidden=4, encoder_depth=2)
    u = model.register(batch)
    sum(model.loss_terms(batch, u).values()).backward()
    grads = [p.grad for p in model.encoder.parameters()]
    # at initialisation only the zero last layer has a non-zero gradient (the layers before it are gated by it)
    assert model.encoder.net[-1].weight.grad.abs().sum() > 0
    assert all(g is not None for g in grads)


def test_3d_model_on_2d_data_is_refused():
    model = LearnGN(spatial_dims=3, features="mind", iterations=1)
    with pytest.raises(ValueError, match="spatial_dims"):
        model.register(_batch())


def test_label_loss_without_labels_is_refused():
    batch = {k: v for k, v in _batch(n=1).items() if "label" not in k}
    model = LearnGN(spatial_dims=2, features="mind", iterations=1, w_label=1.0)
    u = model.register(batch)
    with pytest.raises(ValueError, match="labels"):
        model.loss_terms(batch, u)


def test_bad_arguments():
    with pytest.raises(ValueError, match="label_ids"):
        LearnGN(features="sdm")
    with pytest.raises(ValueError, match="features"):
        LearnGN(features="pixels")
    with pytest.raises(FileNotFoundError, match="no_such.ckpt"):
        LearnGN(features="mind", init_from="no_such.ckpt")


def test_init_from_checks_the_model_class(tmp_path):
    model = LearnGN(features="mind", iterations=1)
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": model.state_dict(), "model_class": "lightning_modules.baselines.gn.HandcraftedGN"},
               other)
    with pytest.raises(ValueError, match="HandcraftedGN"):
        LearnGN(features="mind", iterations=1, init_from=str(other))
    wrong = tmp_path / "wrong.ckpt"
    torch.save({"state_dict": LearnGN(features="intensity").state_dict()}, wrong)
    with pytest.raises(ValueError, match="does not match"):
        load_init_weights(LearnGN(features="mind"), wrong, classes=(LearnGN,))


def test_end_to_end_gradient_matches_finite_differences():
    # the loss gradient through 3 GN iterations (warps, heads, implicit-differentiated solves) in float64
    ds = SyntheticPairs(1, seed=1, shape=(32, 32))
    batch = collate_pairs([ds[0]])
    batch = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}
    model = LearnGN(spatial_dims=2, features="mind", iterations=3, lam_start=3.0, lam_end=1.0, hidden=2,
                    rtol=1e-12, maxiter=5000).double()
    with torch.no_grad():  # leave the handcrafted point so every branch carries gradient
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype))

    def loss():
        return sum(model.loss_terms(batch, model.register(batch)).values())

    loss().backward()
    for name in ("gn.jf.j_head.first.weight", "gn.jf.f_head.rest.0.weight", "gn.jf.j_head.branch.4.weight"):
        p = dict(model.named_parameters())[name]
        i = int(p.grad.abs().flatten().argmax())
        flat = p.data.view(-1)
        with torch.no_grad():
            flat[i] += 1e-6
            lp = loss().item()
            flat[i] -= 2e-6
            lm = loss().item()
            flat[i] += 1e-6
        fd = (lp - lm) / 2e-6
        assert abs(p.grad.view(-1)[i].item() - fd) <= 1e-6 * max(1.0, abs(fd)) + 1e-9, (name, p.grad.view(-1)[i], fd)


def test_encoder_learning_rate_is_its_own_group():
    model = LearnGN(spatial_dims=2, features="mind", encoder_hidden=4, encoder_lr=3e-3, lr=1e-3)
    opt = model.configure_optimizers()
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 3e-3]
    enc = {id(p) for p in model.encoder.parameters()}
    assert {id(p) for p in opt.param_groups[1]["params"]} == enc
    assert not enc & {id(p) for p in opt.param_groups[0]["params"]}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_init_from_an_encoderless_checkpoint_keeps_the_model(tmp_path):
    # fine-tuning with an encoder added: the encoder's weights are absent from the checkpoint and keep their
    # identity initialisation, so the loaded model still computes the saved model's field
    batch = _batch(n=1)
    plain = LearnGN(spatial_dims=2, features="mind", iterations=2, hidden=2)
    torch.nn.init.normal_(plain.heads.j_head.branch[-1].weight, std=0.01)
    path = tmp_path / "plain.ckpt"
    torch.save({"state_dict": plain.state_dict(), "model_class": "lightning_modules.learngn.LearnGN"}, path)
    tuned = LearnGN(spatial_dims=2, features="mind", iterations=2, hidden=2, encoder_hidden=3, init_from=str(path))
    with torch.no_grad():
        torch.testing.assert_close(tuned.register(batch), plain.register(batch), rtol=0, atol=1e-6)
    # ... while other missing weights are still an error
    bad = {k: v for k, v in plain.state_dict().items() if not k.startswith("gn.jf.f_head")}
    torch.save({"state_dict": bad, "model_class": "lightning_modules.learngn.LearnGN"}, path)
    with pytest.raises(ValueError, match="missing keys"):
        LearnGN(spatial_dims=2, features="mind", iterations=2, hidden=2, init_from=str(path))


def _semantic_model(**kw):
    args = dict(spatial_dims=3, features="mind", label_ids=[1, 2], iterations=3, lam_start=0.3, lam_end=0.1,
                rtol=1e-8, semantic=True, semantic_widths=[4, 4, 4, 4, 4, 4], label_loss="dice")
    args.update(kw)
    return LearnGN(**args)


def _batch3d():
    batch = _batch(ndim=3, n=1, shape=(32, 32, 32))
    lab = batch["fixed_label"]
    batch["fixed_label"] = lab.clamp(max=2)
    batch["moving_label"] = batch["moving_label"].clamp(max=2)
    return batch


def test_untrained_semantic_learngn_equals_handcrafted_gn_on_mind():
    """The semantic channels enter with data-term weight 0: the untrained model is handcrafted GN on MIND."""
    batch = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in _batch3d().items()}
    model = _semantic_model().double()
    ref = HandcraftedGN(features="mind", iterations=3, lam=(0.3, 0.1), solver={"rtol": 1e-8}).double()
    with torch.no_grad():
        u = model.register(batch)
        assert u.abs().max() > 0.5
        torch.testing.assert_close(u, ref.register(batch), rtol=0, atol=1e-8)


def test_semantic_weights_get_a_gradient_and_warmup_trains_the_network_alone():
    batch = _batch3d()
    model = _semantic_model(semantic_warmup=1)
    u = model.register(batch)
    terms = model.loss_terms(batch, u)
    sum(terms.values()).backward()
    assert model.semantic_weight.grad is not None and model.semantic_weight.grad.abs().sum() > 0

    model.zero_grad()
    loss = model.training_step(batch, 0)  # epoch 0 < semantic_warmup: the U-Net loss only
    loss.backward()
    assert all(p.grad is None for p in model.heads.parameters())
    assert model.semantic_weight.grad is None
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.semantic_net.parameters())


def test_semantic_optimiser_groups_and_bad_options():
    model = _semantic_model(semantic_lr=0.01, weight_lr=0.05, lr=1e-4)
    groups = model.configure_optimizers().param_groups
    lrs = sorted(g["lr"] for g in groups)
    assert lrs == [1e-4, 0.01, 0.05]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="label_ids"):
        LearnGN(spatial_dims=3, features="mind", semantic=True)
    with pytest.raises(ValueError, match="semantic_warmup"):
        _semantic_model(semantic_warmup=-1)


def test_segment_reads_the_most_negative_map():
    model = _semantic_model()
    maps = torch.tensor([[[[[0.5, -0.2, -1.0, 0.1]]], [[[-0.3, 0.4, -0.5, 0.2]]]]])  # (1, 2, 1, 1, 4)

    class Fixed(torch.nn.Module):
        def forward(self, image):
            return maps

    model.semantic_net = Fixed()
    assert model.segment(torch.zeros(1, 1, 1, 1, 4)).flatten().tolist() == [2, 1, 1, 0]


def test_a_training_step_runs_the_semantic_network_once_per_image():
    """After the warm-up, the maps that feed the registration also feed their own loss (one U-Net pass per
    image, both in one batch), and the step's loss equals the registration terms plus the semantic term computed
    separately."""
    batch = _batch3d()
    model = _semantic_model(semantic_weight_init=0.5).double()
    batch = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in batch.items()}
    calls = []
    model.semantic_net.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    loss = model.training_step(batch, 0)
    assert calls == [2]  # fixed and moving, once each, as one batch
    with torch.no_grad():
        ref = sum(model.loss_terms(batch, model.register(batch)).values()) + model.semantic_term(batch)
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-12, atol=0)


def test_semantic_maps_of_the_pair_in_one_batch_equal_one_call_per_image():
    """The fixed and moving images through the U-Net as one batch (instance norms act per item) against one call
    per image: the same maps and parameter gradients to float64 rounding (measured ~1e-15 of the magnitude)."""
    batch = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in _batch3d().items()}
    batch["moving"] = batch["moving"].flip(-1)  # two different images
    model = _semantic_model().double()
    net = model.semantic_net
    maps = model.semantic_maps(batch)
    ref = net(batch["fixed"]), net(batch["moving"])
    params = list(net.parameters())
    weight = torch.linspace(-1, 1, maps[0].numel(), dtype=torch.float64).view_as(maps[0])
    grads = [torch.autograd.grad((weight * a).sum() + b.pow(2).sum(), params) for a, b in (maps, ref)]
    for a, b in zip(maps, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12 * float(b.detach().abs().max()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12 * max(1.0, float(b.abs().max())))


def test_configure_inference_sets_the_semantic_precision_and_refuses_anything_else():
    """The settings eval.py --method-arg may change on a loaded LearnGN: semantic_precision only."""
    model = _semantic_model()
    model.configure_inference(semantic_precision="bf16")
    assert model.semantic_net.precision == "bf16" and model.hparams.semantic_precision == "bf16"
    batch = _batch3d()
    with torch.no_grad():
        maps = model.semantic_maps(batch)
    assert maps[0].dtype == torch.float32
    model.configure_inference(use_masks=True)
    assert model.use_masks and model.hparams.use_masks
    with pytest.raises(ValueError, match="no option 'lam_start'"):
        model.configure_inference(lam_start=0.1)
    with pytest.raises(ValueError, match="semantic_precision must be one of"):
        model.configure_inference(semantic_precision="fp8")
    with pytest.raises(ValueError, match="semantic network"):
        LearnGN(spatial_dims=2, features="mind").configure_inference(semantic_precision="bf16")
    assert _semantic_model(semantic_precision="bf16").semantic_net.precision == "bf16"
    with pytest.raises(ValueError, match="semantic_precision must be one of"):
        _semantic_model(semantic_precision="32")
