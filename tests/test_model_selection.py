"""Model selection in stage 2: metrics where predicting nothing scores low, student/teacher selection, warnings."""

import json
import logging
import math

import pytest
import torch
from amvlm_monai.handlers.metrics import SegmentationMetric
from amvlm_monai.handlers.selection import SelectBestModel
from ignite.engine import Engine


def _metric(name, pred_logits, label, multiclass=False):
    m = SegmentationMetric(name, multiclass=multiclass)
    m.reset()
    m.update((pred_logits, label, None))
    return m.compute()


def _masks():
    """Three 2x2 images: (1) lesion, half found; (2) no lesion, nothing predicted; (3) lesion, nothing predicted."""
    label = torch.zeros(3, 1, 2, 2)
    label[0, 0, 0] = 1  # two lesion pixels
    label[2, 0, 1, 1] = 1
    pred = torch.full((3, 1, 2, 2), -5.0)
    pred[0, 0, 0, 0] = 5.0  # one of the two found
    return pred, label


def test_dice_present_ignores_images_without_the_class_by_hand():
    pred, label = _masks()
    # Dice per image: 2*1/(1+2) = 2/3, absent in both = 1, missed = 0
    assert math.isclose(_metric("dice", pred, label), (2 / 3 + 1 + 0) / 3, rel_tol=1e-6)
    assert math.isclose(_metric("dice_present", pred, label), (2 / 3 + 0) / 2, rel_tol=1e-6)
    assert math.isclose(_metric("fg_fraction", pred, label), (1 / 4 + 0 + 0) / 3, rel_tol=1e-6)
    assert math.isclose(_metric("label_fg_fraction", pred, label), (2 / 4 + 0 + 1 / 4) / 3, rel_tol=1e-6)


def test_an_empty_predictor_scores_zero_on_dice_present_but_not_on_dice():
    _, label = _masks()
    empty = torch.full_like(label, -5.0)
    assert _metric("dice", empty, label) == pytest.approx(1 / 3)  # the image without a lesion scores 1
    assert _metric("dice_present", empty, label) == 0.0
    assert _metric("fg_fraction", empty, label) == 0.0


def test_dice_present_multiclass_counts_image_class_pairs():
    label = torch.tensor([[[[1, 2], [0, 0]]], [[[0, 0], [0, 0]]]])  # image 0 has classes 1 and 2; image 1 none
    logits = torch.zeros(2, 3, 2, 2)
    logits[:, 0] = 5.0  # background everywhere ...
    logits[0, 1, 0, 0] = 10.0  # ... except class 1 found in image 0
    assert _metric("dice_present", logits, label, multiclass=True) == pytest.approx((1.0 + 0.0) / 2)
    assert _metric("fg_fraction", logits, label, multiclass=True) == pytest.approx((1 / 4 + 0) / 2)
    assert _metric("label_fg_fraction", logits, label, multiclass=True) == pytest.approx((2 / 4 + 0) / 2)
    with pytest.raises(ValueError, match="metric must be one of"):
        SegmentationMetric("accuracy")


class FakeValidator:
    """Stands in for the SupervisedEvaluator: metrics depend on which network it runs and on the epoch."""

    def __init__(self, table):
        self.table = table  # epoch -> network name -> metrics
        self.network = None
        self.state = type("S", (), {"metrics": {}})()
        self.runs = []

    def run(self, epoch):
        self.runs.append((epoch, self.network.name))
        self.state.metrics = dict(self.table[epoch][self.network.name])


def _net(name, value):
    net = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.constant_(net.weight, value)
    net.name = name
    return net


def test_the_better_network_is_kept_and_named(tmp_path, caplog):
    student, teacher = _net("student", 1.0), _net("teacher", 2.0)
    m = lambda d, fg=0.03: {"val_dice_present": d, "val_fg_fraction": fg, "val_label_fg_fraction": 0.03}  # noqa
    table = {1: {"student": m(0.40), "teacher": m(0.55)},
             2: {"student": m(0.50), "teacher": m(0.30, fg=0.001)},  # teacher collapsing: warned
             3: {"student": m(0.60), "teacher": m(0.58)}}
    validator = FakeValidator(table)
    select = SelectBestModel(validator, {"student": student, "teacher": teacher, "none": None}, str(tmp_path))
    engine = Engine(lambda e, b: None)
    prepared = []
    engine.prepare_teacher = lambda: prepared.append(engine.state.epoch)
    saved = []
    with caplog.at_level(logging.INFO, logger="amvlm_monai.handlers.tracking"):
        for epoch in (1, 2, 3):
            engine.state.epoch = epoch
            select(engine)
            saved.append(float(torch.load(tmp_path / "model.pt", weights_only=True)["weight"]))
    assert saved == [2.0, 2.0, 1.0]  # teacher at epoch 1; epoch 2 (0.50) is worse than 0.55: kept; student at 3
    info = json.loads((tmp_path / "model.json").read_text())
    assert info["network"] == "student" and info["epoch"] == 3 and info["value"] == 0.6
    assert info["scores"]["teacher"]["val_dice_present"] == 0.58
    assert prepared == [1, 2, 3] and validator.runs[:2] == [(1, "student"), (1, "teacher")]
    assert engine.state.metrics["teacher_val_dice_present"] == 0.58
    assert validator.network is None  # restored
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "epoch 2: the teacher predicts 0.100 % foreground" in warnings[0]
    # resuming restores the best so far: a worse model never replaces it
    resumed = SelectBestModel(FakeValidator({4: {"student": m(0.59)}}), {"student": _net("student", 9.0)},
                              str(tmp_path))
    resumed.load_state_dict(select.state_dict())
    engine.state.epoch = 4
    resumed(engine)
    assert float(torch.load(tmp_path / "model.pt", weights_only=True)["weight"]) == 1.0


def test_a_missing_key_metric_is_named():
    validator = FakeValidator({1: {"student": {"val_mean_dice": 0.5}}})
    select = SelectBestModel(validator, {"student": _net("student", 1.0)}, "/nonexistent")
    engine = Engine(lambda e, b: None)
    engine.state.epoch = 1
    with pytest.raises(KeyError, match="no metric 'val_dice_present'.*val_mean_dice"):
        select(engine)
    with pytest.raises(ValueError, match="at least one network"):
        SelectBestModel(validator, {"teacher": None}, "/nonexistent")
