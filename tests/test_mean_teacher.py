"""The stage-2 trainer: loaders, EMA teacher, text guidance with cached text features, variants."""

import copy
import math

import pytest
import torch
from conftest import REPORTS
from ignite.engine import Events

from amvlm_monai.engines.ema import make_teacher, recompute_bn_statistics
from amvlm_monai.engines.guidance import build_text_guidance
from amvlm_monai.engines.mean_teacher import MeanTeacherTrainer
from amvlm_monai.engines.step import trainable_parameters
from amvlm_monai.losses.semi import ConsistencyLoss, build_supervised_loss
from amvlm_monai.networks.segmentation import build_segmentation_net


class Batches:
    """A re-iterable list of batches that records what was drawn."""

    def __init__(self, n, size, prefix, labeled, seed):
        g = torch.Generator().manual_seed(seed)
        self.batches = []
        for b in range(n):
            batch = {"image": torch.randn(size, 1, 32, 32, generator=g),
                     "text": [REPORTS[(b * size + i) % len(REPORTS)] for i in range(size)],
                     "id": [f"{prefix}{b * size + i}" for i in range(size)]}
            if labeled:
                batch["label"] = (torch.rand(size, 1, 32, 32, generator=g) > 0.7).float()
            self.batches.append(batch)
        self.drawn = []

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for b in self.batches:
            self.drawn += b["id"]
            yield b


def _net():
    torch.manual_seed(0)
    return build_segmentation_net(channels=(4, 8, 16), strides=(2, 2))


@pytest.fixture
def stage1_ckpt(tiny_amvlm, tmp_path):
    path = tmp_path / "amvlm.pt"
    torch.save({"model": tiny_amvlm.state_dict(), "config": tiny_amvlm.config}, path)
    return path


def _trainer(labeled, unlabeled=None, guidance=None, epochs=1, **kwargs):
    net = _net()
    teacher = make_teacher(net) if unlabeled is not None else None
    opt = torch.optim.Adam(trainable_parameters([net, guidance]), lr=1e-2)
    trainer = MeanTeacherTrainer("cpu", epochs, labeled, net, opt, build_supervised_loss(),
                                 unlabeled_loader=unlabeled, teacher=teacher,
                                 consistency_loss=ConsistencyLoss() if unlabeled is not None else None,
                                 consistency_max=1.0, rampup_epochs=2, guidance=guidance, **kwargs)
    outputs = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(dict(e.state.output)))
    return trainer, net, teacher, outputs


def test_every_unlabeled_image_is_used_once_per_epoch():
    labeled = Batches(2, 2, "l", True, 0)
    unlabeled = Batches(5, 2, "u", False, 1)
    trainer, *_ , outputs = _trainer(labeled, unlabeled, epochs=2)
    trainer.run()
    assert trainer.state.epoch_length == 5 and len(outputs) == 10
    assert sorted(unlabeled.drawn) == sorted([f"u{i}" for i in range(10)] * 2)
    assert set(labeled.drawn) == {"l0", "l1", "l2", "l3"}  # the labelled loader cycles
    assert {"sup", "consistency", "consistency_weight", "loss"} <= set(outputs[0])
    first, last = outputs[0], outputs[-1]
    assert math.isclose(first["loss"], first["sup"] + first["consistency_weight"] * first["consistency"], rel_tol=1e-5)
    assert last["consistency_weight"] > first["consistency_weight"]  # ramp-up


@pytest.mark.parametrize("teacher_bn", ["ema", "batch", "recompute"])
def test_teacher_is_the_ema_of_the_student(teacher_bn):
    labeled, unlabeled = Batches(1, 2, "l", True, 0), Batches(1, 2, "u", False, 1)
    trainer, net, teacher, _ = _trainer(labeled, unlabeled, teacher_bn=teacher_bn, teacher_noise=0.0)
    start = {k: v.clone() for k, v in teacher.module.state_dict().items()}
    own = copy.deepcopy(teacher.module).train()  # what the teacher's own forward pass does to its statistics
    with torch.no_grad():
        own(unlabeled.batches[0]["image"])
    recomputed = copy.deepcopy(teacher.module)  # re-estimated at the epoch start on the unlabelled batch
    recompute_bn_statistics(recomputed, [unlabeled.batches[0]["image"]], "cpu")
    trainer.run()
    # one step at t = 1: alpha = min(1 - 1/2, 0.99) = 0.5, so teacher = (start + student) / 2
    params = dict(net.named_parameters())
    for key, value in teacher.module.state_dict().items():
        if key in params:
            expected = 0.5 * start[key] + 0.5 * params[key]
        elif not value.is_floating_point():
            continue
        elif teacher_bn == "ema":  # statistics averaged like the parameters
            expected = 0.5 * start[key] + 0.5 * net.state_dict()[key]
        else:
            expected = (own if teacher_bn == "batch" else recomputed).state_dict()[key]
            assert not torch.allclose(expected, start[key]), key
        assert torch.allclose(value, expected, atol=1e-6), key
    assert any("running_mean" in k for k in start)
    assert not teacher.training and not teacher.module.training


def test_recompute_bn_statistics_is_the_plain_average_and_keeps_weights():
    net = _net()
    batches = [torch.randn(3, 1, 32, 32) + i for i in range(2)]
    weights = {k: v.clone() for k, v in net.named_parameters()}
    assert recompute_bn_statistics(net, batches, "cpu") == 6
    bn = next(m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert bn.momentum == 0.1 and not net.training  # momentum restored, eval mode
    # the first BatchNorm sees the first convolution's output: its running mean is the mean over both batches
    first_conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    with torch.no_grad():
        means = [first_conv(b).mean((0, 2, 3)) for b in batches]
    assert torch.allclose(bn.running_mean, (means[0] + means[1]) / 2, atol=1e-5)
    assert all(torch.equal(v, weights[k]) for k, v in net.named_parameters())
    assert recompute_bn_statistics(net, [], "cpu") == 0
    assert torch.allclose(bn.running_mean, (means[0] + means[1]) / 2, atol=1e-5)  # nothing seen: unchanged


def test_supervised_only_and_invalid_combinations():
    labeled = Batches(2, 2, "l", True, 0)
    trainer, *_, outputs = _trainer(labeled)
    trainer.run()
    assert set(outputs[0]) == {"sup", "loss"} and len(outputs) == 2
    net = _net()
    with pytest.raises(ValueError, match="teacher"):
        MeanTeacherTrainer("cpu", 1, labeled, net, torch.optim.SGD(net.parameters(), 0.1), build_supervised_loss(),
                           unlabeled_loader=Batches(1, 2, "u", False, 1))


def test_text_guidance_trains_the_decoder_only_and_caches_text(stage1_ckpt):
    guidance = build_text_guidance(str(stage1_ckpt))
    encoder_before = {k: v.clone() for k, v in guidance.amvlm.state_dict().items()}
    decoder_before = [p.clone() for p in guidance.generator.parameters() if p.requires_grad]
    calls = []
    original = guidance.amvlm.text_embeddings
    guidance.amvlm.text_embeddings = lambda texts: calls.append(list(texts)) or original(texts)
    labeled, unlabeled = Batches(2, 3, "l", True, 0), Batches(3, 2, "u", False, 1)
    trainer, *_, outputs = _trainer(labeled, unlabeled, guidance, epochs=2, diagnostic_interval=4)
    seen = []  # batch sizes through the frozen image tower
    guidance.generator.patch_encoder.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    trainer.run()
    assert "tg" in outputs[0] and all(math.isfinite(o["tg"]) for o in outputs)
    # the diagnostic at iterations 1 and 5 only; the tower sees the 2 unlabelled images every step and the 3
    # labelled ones only for the diagnostic
    assert [i for i, o in enumerate(outputs) if "text_mask_dice" in o] == [0, 4]
    assert all(0.0 <= o["text_mask_dice"] <= 1.0 for o in outputs if "text_mask_dice" in o)
    assert seen == [2, 3, 2, 2, 2, 2, 3, 2]
    # each distinct report encoded exactly once over 2 epochs and 6 steps
    encoded = [t for c in calls for t in c]
    assert sorted(encoded) == sorted(set(REPORTS))
    for key, value in guidance.amvlm.state_dict().items():
        assert torch.equal(value, encoder_before[key]), key  # frozen towers and their BatchNorm statistics
    after = [p for p in guidance.generator.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(after, decoder_before))
    assert guidance.tg_loss.logit_scale.requires_grad


def test_guidance_without_tg_and_fusion_uses_the_text_mask(stage1_ckpt):
    guidance = build_text_guidance(str(stage1_ckpt), use_tg=False)
    images = torch.randn(2, 1, 32, 32)
    masks, tg = guidance(images, REPORTS[:2])
    assert tg is None and masks.shape == (2, 1, 32, 32) and 0 <= masks.min() and masks.max() <= 1
    logits = torch.zeros(2, 1, 32, 32)
    fused = guidance.fuse(logits, masks, multiclass=False)
    # teacher undecided (logit 0): the pseudo label is the text mask itself (lambda = 1)
    assert torch.allclose(fused, masks.clamp(1e-6, 1 - 1e-6), atol=1e-5)
    with pytest.raises(ValueError, match="fusion_mode"):
        build_text_guidance(str(stage1_ckpt), fusion_mode="double")


def test_text_mask_dice_diagnostic_by_hand():
    from amvlm_monai.engines.mean_teacher import text_mask_dice

    masks = torch.zeros(2, 1, 2, 2)
    masks[0, 0, 0] = 0.9  # image 0 predicts the top row
    masks[1, 0, 1] = 0.9  # image 1 predicts the bottom row, and has no lesion: not counted
    label = torch.zeros(2, 1, 2, 2)
    label[0, 0, :, 0] = 1  # the left column
    assert math.isclose(float(text_mask_dice(masks, label, False)), 2 * 1 / (2 + 2))
    assert text_mask_dice(masks, torch.zeros_like(label), False) is None  # no lesion in the batch: no figure
    # multi-class: masks for the 2 foreground classes of a 3-class index label; class 2 absent from image 1
    idx = torch.tensor([[[[1, 2], [0, 0]]], [[[1, 1], [0, 0]]]])
    fg = torch.zeros(2, 2, 2, 2)
    fg[0, 0, 0, 0] = fg[0, 1, 0, 1] = 1.0  # image 0: both right
    fg[1, 0, 0, 0] = 1.0  # image 1: class 1 Dice 2*1/(1+2)
    assert math.isclose(float(text_mask_dice(fg, idx, True)), (1 + 1 + 2 / 3) / 3, rel_tol=1e-6)


def _blobs(n, g):
    """n 32 px images with 0-2 bright disks on noise, and the disks as labels."""
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    images, labels = [], []
    for _ in range(n):
        lab = torch.zeros(32, 32)
        for _ in range(int(torch.randint(0, 3, (1,), generator=g))):
            cy, cx = torch.randint(6, 26, (2,), generator=g).float()
            r = 2 + 3 * torch.rand(1, generator=g)
            lab = torch.maximum(lab, (((yy - cy) ** 2 + (xx - cx) ** 2) < r ** 2).float())
        images.append(lab * 0.8 + 0.5 * torch.randn(32, 32, generator=g))
        labels.append(lab)
    return torch.stack(images)[:, None], torch.stack(labels)[:, None]


@pytest.mark.parametrize("teacher_bn", ["ema", "batch", "recompute"])
def test_only_the_averaged_statistics_do_not_fit_the_teachers_weights(teacher_bn):
    """A tiny run: the teacher's running variance against the variance its own weights produce on the unlabelled
    images. Averaging the student's statistics ("ema") overestimates it (the mechanism of the collapse to
    background: every layer shrinks its activations); the teacher's own statistics fit."""
    g = torch.Generator().manual_seed(0)
    x_l, y_l = _blobs(8, g)
    x_u, _ = _blobs(64, g)
    labeled = [{"image": x_l, "label": y_l, "text": [""] * 8}]
    unlabeled = [{"image": x_u[i:i + 8], "text": [""] * 8} for i in range(0, 64, 8)]
    torch.manual_seed(0)
    net = build_segmentation_net(channels=(8, 16, 32), strides=(2, 2))
    teacher = make_teacher(net)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    MeanTeacherTrainer("cpu", 5, labeled, net, opt, build_supervised_loss(), unlabeled_loader=unlabeled,
                       teacher=teacher, consistency_loss=ConsistencyLoss(), consistency_max=0.1, rampup_epochs=1,
                       teacher_bn=teacher_bn).run()
    own = copy.deepcopy(teacher.module)
    recompute_bn_statistics(own, [x_u], "cpu")
    bns = [m for m in teacher.module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    refs = [m for m in own.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    ratios = torch.stack([(a.running_var / b.running_var).mean() for a, b in zip(bns, refs)])
    with torch.no_grad():
        gap = (torch.sigmoid(teacher(x_u)) - torch.sigmoid(own(x_u))).abs().mean()
    if teacher_bn == "ema":
        assert ratios.mean() > 1.4 and (ratios > 1.05).all(), ratios  # too large in every layer
        assert gap > 0.025
    else:
        assert ((ratios > 0.8) & (ratios < 1.25)).all(), ratios
        assert gap < 0.02
