"""scripts/oracle_text_mask.py: the oracle's pseudo labels are the hidden labels, and in a bundle run they reach the
consistency term as the unlabelled batch's own masks."""

import json
from pathlib import Path

import pytest
import torch
from conftest import train_qata_bundle

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture
def oracle(monkeypatch):
    """The script's module under the name its overlay's targets use."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import oracle_text_mask

    return oracle_text_mask


def test_fused_oracle_mask_is_the_hidden_label_and_lambda_zero_the_teacher(oracle):
    torch.manual_seed(0)
    logits = torch.empty(2, 1, 8, 8).uniform_(-6, 6)
    label = (torch.rand(2, 1, 8, 8) > 0.7).float()
    guidance = oracle.OracleGuidance()
    guidance.label = label
    masks, tg = guidance(torch.zeros(2, 1, 8, 8), ["a", "b"])
    assert tg is None and torch.equal(masks, label)
    assert torch.allclose(guidance.fuse(logits, masks, multiclass=False), label, atol=1e-3)
    teacher_only = oracle.OracleGuidance(fusion_lambda=0.0).fuse(logits, masks, multiclass=False)
    assert torch.allclose(teacher_only, torch.sigmoid(logits))


def test_a_batch_without_its_label_is_refused(oracle):
    guidance = oracle.OracleGuidance()
    with pytest.raises(RuntimeError, match="no hidden label"):
        guidance(torch.zeros(2, 1, 8, 8), ["a", "b"])
    guidance.label = torch.zeros(3, 1, 8, 8)
    with pytest.raises(RuntimeError, match=r"\(2, 1, 8, 8\)"):
        guidance(torch.zeros(2, 1, 8, 8), ["a", "b"])
    with pytest.raises(ValueError, match="binary"):
        guidance.fuse(torch.zeros(2, 3, 8, 8), torch.zeros(2, 2, 8, 8), multiclass=True)


def test_bundle_run_trains_the_consistency_term_on_the_hidden_labels(oracle, demo_data, tmp_path, monkeypatch):
    from amvlm_monai.data.datalist import load_datalist
    from amvlm_monai.data.splits import hidden_label_items
    from amvlm_monai.losses.semi import ConsistencyLoss
    from amvlm_monai.transforms.pipelines import segmentation_transforms

    targets, masks = [], []
    forward, loss = oracle.OracleGuidance.forward, ConsistencyLoss.forward
    monkeypatch.setattr(oracle.OracleGuidance, "forward", lambda self, x, t: masks.append(forward(self, x, t)[0]) or
                        (masks[-1], None))
    monkeypatch.setattr(ConsistencyLoss, "forward", lambda self, s, target: targets.append(target) or loss(self, s, target))
    overlay = tmp_path / "oracle.json"
    overlay.write_text(json.dumps(oracle.overlay()))
    split = demo_data / "split_labeled25.json"
    train_qata_bundle(tmp_path, split, variants=("mean_teacher",), extra_configs=(overlay,), pseudo_label_diagnostic=True,
                      unlabeled_batch_size=4, **{"train#unlabeled_preprocessing#augment": False})
    chain = segmentation_transforms(32, labeled=True)
    truth = [(torch.as_tensor(chain(it)["label"]) > 0.5).float()
             for it in hidden_label_items(load_datalist(str(split), "training"))]
    assert targets and len(targets) == len(masks)
    for target, mask in zip(targets, masks):
        assert mask.shape == target.shape == (4, 1, 32, 32)
        assert torch.allclose(target, mask, atol=1e-3)  # the student is pulled towards the masks
        for m in mask:  # each is the hidden label of an unlabelled image
            assert any(torch.equal(m, t) for t in truth)
    assert sum(float(m.sum()) for m in masks) > 0
    scored = (tmp_path / "m" / "pseudo_labels.csv").read_text()
    assert "pseudo_teacher_dice" in scored and "pseudo_text_dice" not in scored
