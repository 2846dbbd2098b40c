"""scripts/patch_probe.py: the linear probe separates what is separable and not what is not; runs on a tiny model."""

import pytest
import torch
from conftest import load_script


def _script():
    return load_script("patch_probe")


def test_probe_auc_separable_and_random():
    probe = _script().probe_auc
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 8, generator=g)
    y = x[:, 3] > 1.2  # ~12 % positives, linearly separable
    assert probe(x[:300], y[:300], x[300:], y[300:]) > 0.97
    noise = torch.rand(400, generator=g) < 0.12  # labels unrelated to x
    assert probe(x[:300], noise[:300], x[300:], noise[300:]) == pytest.approx(0.5, abs=0.15)


def test_patch_features_label_patches_by_lesion_cover(tiny_amvlm):
    features = _script().patch_features
    label = torch.zeros(2, 1, 32, 32)
    label[0, 0, :8, :8] = 1  # exactly the first 8x8 patch of image 0
    label[1, 0, :8, :2] = 1  # a quarter of it in image 1
    tokens, local, labels = features(tiny_amvlm.eval(), {"image": torch.randn(2, 1, 32, 32), "label": label}, 0.5)
    p = 16  # 4 x 4 patches of 8 px
    assert tokens.shape[0] == local.shape[0] == labels.shape[0] == 2 * p
    assert labels.nonzero().flatten().tolist() == [0]
