"""The AMVLM model, its stage-1 objective and the pretraining engine."""

import math

import pytest
import torch
from conftest import REPORTS, TINY
from ignite.engine import Events

from amvlm_monai.losses.amvlm import AMVLMLoss


def _batch(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 1, 32, 32, generator=g)
    return x, model.tokenize(REPORTS), x.flip(-1), model.tokenize(REPORTS[::-1])


def test_encoders_give_normalised_projected_tokens(tiny_amvlm):
    x, tok, _, _ = _batch(tiny_amvlm)
    img, txt = tiny_amvlm.encode_image(x), tiny_amvlm.encode_text(tok)
    assert img.cls.shape == (4, 16) and img.tokens.shape == (4, 16, 16)
    assert torch.allclose(img.cls.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.allclose(txt.tokens.norm(dim=-1)[txt.mask], torch.ones(int(txt.mask.sum())), atol=1e-5)
    assert (txt.tokens[~txt.mask] == 0).all()
    # "No lesion is visible." has 5 words (with the period), the long report more
    assert txt.mask.sum(1).tolist()[1] == 5 and txt.mask.sum(1)[0] > 10


def test_total_loss_is_the_weighted_sum_of_its_terms(tiny_amvlm):
    loss = AMVLMLoss(ita_weight=1.0, css_weight=0.5, local_weight=0.1, icl_weight=0.1, mil_weight=0.3)
    terms = loss(tiny_amvlm, *_batch(tiny_amvlm))
    expected = terms["ita"] + 0.5 * terms["css"] + 0.1 * terms["local"] + 0.1 * terms["icl"] + 0.3 * terms["mil"]
    assert math.isclose(float(terms["loss"]), float(expected), rel_tol=1e-6)
    parts = [terms[f"icl_{k}"] for k in ("coarse_image", "coarse_text", "fine_image", "fine_text")]
    assert math.isclose(float(terms["icl"]), float(sum(parts) / 4), rel_tol=1e-5)


def test_gradients_reach_exactly_the_trainable_parts(tiny_amvlm):
    terms = AMVLMLoss()(tiny_amvlm, *_batch(tiny_amvlm))
    terms["loss"].backward()
    named = dict(tiny_amvlm.named_parameters())
    momentum = [n for n in named if n.startswith("momentum_")]
    assert momentum and all(named[n].grad is None for n in momentum)
    assert all(not named[n].requires_grad for n in momentum)
    missing = [n for n, p in named.items() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert missing == []


@pytest.mark.parametrize("off, idle", [
    ("css_weight", ("attend_words", "attend_patches", "pdt_")),
    ("icl_weight", ()),
    ("local_weight", ()),
    ("mil_weight", ()),  # 0 by default: not in the paper
])
def test_a_zero_weight_skips_its_term(tiny_amvlm, off, idle, monkeypatch):
    loss = AMVLMLoss(**{off: 0.0})
    calls = []
    if off == "icl_weight":
        monkeypatch.setattr(tiny_amvlm, "momentum_encode_image", lambda *a: calls.append(1))
    terms = loss(tiny_amvlm, *_batch(tiny_amvlm))
    assert off.split("_")[0] not in terms and not calls
    terms["loss"].backward()
    for name, p in tiny_amvlm.named_parameters():
        if name.startswith(idle) if idle else False:
            assert p.grad is None, name


def test_pdt_mode_none_leaves_the_pdt_untrained(tiny_amvlm):
    terms = AMVLMLoss(pdt_mode="none")(tiny_amvlm, *_batch(tiny_amvlm))
    terms["loss"].backward()
    assert all(p.grad is None for n, p in tiny_amvlm.named_parameters() if n.startswith("pdt_"))
    modulated = AMVLMLoss()(tiny_amvlm, *_batch(tiny_amvlm))
    assert not math.isclose(float(terms["css"]), float(modulated["css"]), rel_tol=1e-4)


def test_icl_needs_views_and_options_are_validated(tiny_amvlm):
    x, tok, _, _ = _batch(tiny_amvlm)
    with pytest.raises(ValueError, match="images_aug"):
        AMVLMLoss()(tiny_amvlm, x, tok)
    with pytest.raises(ValueError, match="css_weight"):
        AMVLMLoss(css_weight=-1)
    with pytest.raises(ValueError, match="nothing to train"):
        AMVLMLoss(0, 0, 0, 0)


def test_momentum_copies_follow_the_online_encoders(tiny_amvlm):
    m = tiny_amvlm
    with torch.no_grad():
        for p in m.image_global.parameters():
            p.add_(1.0)
    before = [p.clone() for p in m.momentum_image_global.parameters()]
    m.update_momentum()
    for b, p, q in zip(before, m.momentum_image_global.parameters(), m.image_global.parameters()):
        assert torch.allclose(p, 0.995 * b + 0.005 * q, atol=1e-6)
    m.train()
    assert not m.momentum_image_encoder.training


def test_checkpoint_round_trip_rebuilds_without_config(tiny_amvlm, tmp_path):
    from amvlm_monai.networks.amvlm import load_amvlm

    path = tmp_path / "ckpt.pt"
    torch.save({"model": tiny_amvlm.state_dict(), "config": tiny_amvlm.config}, path)
    loaded = load_amvlm(path)
    x = torch.randn(2, 1, 32, 32)
    tiny_amvlm.eval(), loaded.eval()
    assert torch.allclose(loaded.patch_embeddings(x), tiny_amvlm.patch_embeddings(x), atol=1e-6)
    assert torch.allclose(loaded.text_embeddings(REPORTS[:2]), tiny_amvlm.text_embeddings(REPORTS[:2]), atol=1e-6)
    assert not loaded.with_momentum
    torch.save({"weights": {}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="bad.pt.*'model' and 'config'"):
        load_amvlm(tmp_path / "bad.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_amvlm(tmp_path / "missing.pt")


def test_pretrainer_trains_logs_every_term_and_saves(tiny_amvlm, demo_data, tmp_path):
    from amvlm_monai.handlers.checkpoint import SavePretrained
    from monai.data import DataLoader, Dataset

    from amvlm_monai.data.datalist import load_datalist
    from monai.engines.utils import IterationEvents

    from amvlm_monai.engines.pretrainer import AMVLMPretrainer
    from amvlm_monai.engines.step import trainable_parameters
    from amvlm_monai.networks.amvlm import load_amvlm
    from amvlm_monai.transforms.pipelines import pretrain_transforms

    items = load_datalist(demo_data / "datalist.json", "training")
    loader = DataLoader(Dataset(items, pretrain_transforms(32)), batch_size=4, shuffle=True, drop_last=True)
    opt = torch.optim.Adam(trainable_parameters([tiny_amvlm]), lr=1e-3)
    before = tiny_amvlm.image_global.net[0].weight.clone() if hasattr(tiny_amvlm.image_global, "net") else \
        next(tiny_amvlm.image_global.parameters()).clone()
    ckpt = tmp_path / "models" / "amvlm.pt"
    outputs = []
    trainer = AMVLMPretrainer("cpu", 2, loader, tiny_amvlm, opt, AMVLMLoss(), epoch_length=2,
                              train_handlers=[SavePretrained(str(ckpt), tiny_amvlm, opt)])
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(e.state.output))
    probe = next(tiny_amvlm.image_global.parameters())
    at_backward = []  # as MONAI's trainers: BACKWARD_COMPLETED sees the gradients, before the optimiser step

    def backward_completed(engine):
        at_backward.append((probe.grad is not None, probe.detach().clone()))

    trainer.add_event_handler(IterationEvents.BACKWARD_COMPLETED, backward_completed)
    steps = []
    trainer.add_event_handler(IterationEvents.MODEL_COMPLETED, lambda e: steps.append(probe.detach().clone()))
    trainer.run()
    assert len(outputs) == 4 and len(at_backward) == 4
    assert all(has_grad for has_grad, _ in at_backward)
    assert torch.equal(at_backward[1][1], steps[0]) and not torch.equal(at_backward[1][1], steps[1])
    assert {"loss", "ita", "css", "local", "icl", "icl_fine_text"} <= set(outputs[0])
    assert all(math.isfinite(o["loss"]) for o in outputs)
    after = next(tiny_amvlm.image_global.parameters())
    assert not torch.equal(before, after)
    saved = torch.load(ckpt, weights_only=True)  # the config holds only plain values
    assert set(saved) == {"model", "config", "optimizer", "epoch"} and saved["epoch"] == 2
    assert load_amvlm(ckpt).config["embed_dim"] == TINY["embed_dim"]


def test_pretrainer_stops_on_non_finite_loss_naming_the_batch(tiny_amvlm):
    from amvlm_monai.engines.pretrainer import AMVLMPretrainer

    x = torch.full((4, 1, 32, 32), float("nan"))
    batch = {"image": x, "image_aug": x, "text": REPORTS, "text_aug": REPORTS, "id": ["a", "b", "c", "d"]}
    opt = torch.optim.SGD(tiny_amvlm.parameters(), lr=0.1)
    trainer = AMVLMPretrainer("cpu", 1, [batch], tiny_amvlm, opt, AMVLMLoss())
    with pytest.raises((FloatingPointError, ValueError), match="(?i)non-finite|not finite"):
        trainer.run()


def test_pretrainer_amp_path_runs_on_cpu_with_bfloat16(tiny_amvlm):
    """AMP is configuration, not a fork: on CPU it autocasts to bfloat16 and the losses stay float32 and finite."""
    from amvlm_monai.engines.pretrainer import AMVLMPretrainer

    x = torch.randn(4, 1, 32, 32)
    batch = {"image": x, "image_aug": x.flip(-1), "text": REPORTS, "text_aug": REPORTS[::-1]}
    opt = torch.optim.Adam(tiny_amvlm.parameters(), lr=1e-3)
    outputs = []
    trainer = AMVLMPretrainer("cpu", 1, [batch, batch], tiny_amvlm, opt, AMVLMLoss(), amp="bf16")
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(e.state.output))
    dtypes = []
    tiny_amvlm.image_encoder.blocks[0].mlp.fc1.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    trainer.run()
    assert trainer.step.scaler is None and dtypes[0] == torch.bfloat16  # the grad scaler is for float16 only
    assert len(outputs) == 2 and all(math.isfinite(o["loss"]) for o in outputs)


def test_pretraining_param_groups_give_the_text_encoder_its_own_rate(tiny_amvlm):
    from amvlm_monai.engines.step import param_groups

    groups = param_groups(tiny_amvlm, lr=1e-3, text_lr=3e-5)
    text = {id(p) for p in tiny_amvlm.text_encoder.parameters() if p.requires_grad}
    assert [g["lr"] for g in groups] == [1e-3, 3e-5]
    assert {id(p) for p in groups[1]["params"]} == text
    listed = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in tiny_amvlm.parameters() if p.requires_grad]
    assert sorted(listed) == sorted(trainable) and len(set(listed)) == len(listed)


def test_a_text_rate_of_zero_freezes_the_text_encoder_but_not_its_heads(tiny_amvlm):
    from amvlm_monai.engines.step import param_groups

    groups = param_groups(tiny_amvlm, lr=1e-3, text_lr=0)
    assert len(groups) == 1 and not any(p.requires_grad for p in tiny_amvlm.text_encoder.parameters())
    listed = {id(p) for p in groups[0]["params"]}
    assert {id(p) for p in tiny_amvlm.text_global.parameters()} <= listed
    assert not {id(p) for p in tiny_amvlm.text_encoder.parameters()} & listed
    tiny_amvlm.train()  # the frozen tower stays in eval mode (no dropout noise); everything trainable trains
    assert not any(m.training for m in tiny_amvlm.text_encoder.modules())
    assert tiny_amvlm.text_global.training and tiny_amvlm.image_encoder.training
    tokens = tiny_amvlm.tokenize(["No lesion is visible."] * 2)
    with torch.no_grad():
        cls = tiny_amvlm.text_encoder(**tokens).cls
    torch.testing.assert_close(cls[0], cls[1])  # deterministic: no dropout


def test_a_conv_stem_checkpoint_loads_back_with_its_stem(tmp_path):
    from amvlm_monai.handlers.checkpoint import save_pretrained
    from conftest import TINY

    from amvlm_monai.networks.amvlm import AMVLM, load_amvlm

    torch.manual_seed(0)
    model = AMVLM(**TINY, patch_embed="conv").eval()
    save_pretrained(str(tmp_path / "a.pt"), model)
    loaded = load_amvlm(tmp_path / "a.pt").eval()
    assert loaded.config["patch_embed"] == "conv"
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(x).tokens, model.encode_image(x).tokens)


def test_icl_text_view_tells_reports_apart_at_the_start(tiny_amvlm):
    """In training mode the momentum copies normalise with batch statistics: at the start (copies equal to the online
    towers) each report's own view is its nearest, and the coarse text ICL term is well below chance, ln(B).
    With the copies' lagging running statistics every report's view was the same vector and the term sat at ln(B)."""
    tiny_amvlm.train()
    for m in tiny_amvlm.modules():  # dropout off in the online towers too: both sides then compute the same function
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    tokens = tiny_amvlm.tokenize(REPORTS)
    with torch.no_grad():
        online = tiny_amvlm.encode_text(tokens).cls
        view = tiny_amvlm.momentum_encode_text(tokens).cls
    torch.testing.assert_close(view, online)
    sims = online @ view.T
    assert torch.equal(sims.argmax(1), torch.arange(len(REPORTS)))
    x = torch.randn(len(REPORTS), 1, 32, 32)
    terms = AMVLMLoss()(tiny_amvlm, x, tokens, x, tokens)
    assert float(terms["icl_coarse_text"]) < math.log(len(REPORTS)) - 0.5


def test_linear_heads_round_trip_through_a_checkpoint(tmp_path):
    from amvlm_monai.networks.amvlm import AMVLM, load_amvlm

    torch.manual_seed(0)
    m = AMVLM(**{**TINY, "with_momentum": False}, head="linear").eval()
    assert m.config["head"] == "linear"
    assert not any(isinstance(x, torch.nn.BatchNorm1d) for x in m.image_global.modules())
    torch.save({"model": m.state_dict(), "config": m.config}, tmp_path / "lin.pt")
    loaded = load_amvlm(tmp_path / "lin.pt").eval()
    x = torch.randn(2, 1, 32, 32)
    assert torch.allclose(loaded.patch_embeddings(x), m.patch_embeddings(x), atol=1e-6)
    old = {**m.config}
    del old["head"]  # a checkpoint written before the option: MGCA's heads
    assert AMVLM(**{**old, "with_momentum": False}).config["head"] == "mlp"
