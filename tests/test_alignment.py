"""Stage-1 validation metrics: retrieval recall with chance levels, localisation AUC, text-mask Dice."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from amvlm_monai.evaluation.alignment import localisation_scores, retrieval_recall, roc_auc


def _brute_recall(sim, index, k):
    """Independent formulation: sort every row / column and look for a correct item among the first k."""
    n, u = len(sim), len(sim[0])
    i2t = sum(index[i] in sorted(range(u), key=lambda j: -sim[i][j])[:k] for i in range(n)) / n
    t2i = 0.0
    for j in range(u):
        best = sorted(range(n), key=lambda i: -sim[i][j])[:k]
        t2i += any(index[i] == j for i in best)
    return i2t, t2i / u


def _brute_chance(n, members, k):
    """Chance that k of n images drawn at random contain one of ``members``: by enumeration."""
    draws = list(itertools.combinations(range(n), k))
    return sum(any(i in members for i in d) for d in draws) / len(draws)


def test_retrieval_recall_against_sorting_and_enumeration():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(7, 5, generator=g), dim=1)
    txt = F.normalize(torch.randn(4, 5, generator=g), dim=1)
    index = torch.tensor([0, 1, 1, 2, 3, 3, 3])  # reports 1 and 3 are shared by several images
    sim = (img @ txt.T).tolist()
    for k in (1, 2):
        out = retrieval_recall(img, txt, index, ks=(k,))
        i2t, t2i = _brute_recall(sim, index.tolist(), k)
        assert out[f"i2t_r{k}"] == pytest.approx(i2t) and out[f"t2i_r{k}"] == pytest.approx(t2i)
        assert out[f"i2t_r{k}_chance"] == pytest.approx(k / 4)
        chance = sum(_brute_chance(7, {i for i in range(7) if index[i] == j}, k) for j in range(4)) / 4
        assert out[f"t2i_r{k}_chance"] == pytest.approx(chance)


def test_perfect_alignment_and_the_own_report_by_hand():
    e = torch.eye(3)
    out = retrieval_recall(e, e, torch.arange(3), ks=(1, 5))
    assert out["i2t_r1"] == out["t2i_r1"] == 1.0 and out["i2t_r1_chance"] == pytest.approx(1 / 3)
    assert out["i2t_r5"] == 1.0 and out["i2t_r5_chance"] == 1.0  # k >= U: every report is retrieved
    # image 0 prefers report 1 over its own report 0: a miss at k = 1, a hit at k = 2
    img = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    out = retrieval_recall(img, txt, torch.tensor([0, 1]), ks=(1,))
    assert out["i2t_r1"] == 0.5  # image 1 finds report 1
    assert out["t2i_r1"] == 1.0  # report 0's best image is image 0 (0.6 > 0.0), report 1's is image 1 (1.0 > 0.8)
    with pytest.raises(ValueError, match="text_index"):
        retrieval_recall(img, txt, torch.tensor([0]))


def test_roc_auc_by_hand_and_by_pairs():
    assert roc_auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == 0.75
    assert roc_auc(torch.tensor([1.0, 1.0]), torch.tensor([0, 1])) == 0.5  # a tie counts half
    assert math.isnan(roc_auc(torch.tensor([1.0, 2.0]), torch.tensor([1, 1])))
    g = torch.Generator().manual_seed(1)
    s, y = torch.randint(0, 5, (40,), generator=g).float(), torch.rand(40, generator=g) > 0.6
    pos, neg = s[y], s[~y]
    pairs = ((pos[:, None] > neg[None]).float() + 0.5 * (pos[:, None] == neg[None]).float()).mean()
    assert roc_auc(s, y) == pytest.approx(float(pairs))


def test_localisation_by_hand():
    sim = torch.zeros(2, 2, 2)
    sim[0, 0, 0] = 0.9  # image 0: the top-left patch is similar to the report, and the lesion is there
    labels = torch.zeros(2, 1, 4, 4)
    labels[0, 0, :2, :2] = 1
    out = localisation_scores(sim, labels, bias=0.25)
    assert out["n_lesion_images"] == 1  # image 1 has no lesion: not scored
    up = F.interpolate(sim[:1, None], size=(4, 4), mode="bilinear", align_corners=False)[0, 0]
    assert out["loc_auc"] == pytest.approx(roc_auc(up, labels[0, 0] > 0))
    pred = up > 0.25
    target = labels[0, 0] > 0
    assert out["initial_mask_dice"] == pytest.approx(float(2 * (pred & target).sum() / (pred.sum() + target.sum())))
    assert out["ones_dice"] == pytest.approx(2 * 4 / (16 + 4))
    assert out["loc_auc"] > 0.9


def test_evaluate_alignment_on_a_tiny_model(tiny_amvlm):
    from conftest import REPORTS

    from amvlm_monai.evaluation.alignment import evaluate_alignment

    g = torch.Generator().manual_seed(0)
    labels = (torch.rand(4, 1, 32, 32, generator=g) > 0.8).float()
    batches = [{"image": torch.randn(2, 1, 32, 32, generator=g), "label": labels[i:i + 2],
                "text": [REPORTS[i], REPORTS[1]]} for i in (0, 2)]
    tiny_amvlm.train()
    out = evaluate_alignment(tiny_amvlm, batches, ks=(1, 5))
    assert tiny_amvlm.training  # restored
    assert out["n_images"] == 4 and out["n_reports"] == 3  # REPORTS[1] twice
    assert out["i2t_r5"] == 1.0 and out["n_lesion_images"] == 4
    for key in ("i2t_r1", "t2i_r1", "loc_auc", "initial_mask_dice", "ones_dice"):
        assert 0.0 <= out[key] <= 1.0, key
    assert out["alignment"] == pytest.approx((out["i2t_r5"] + out["t2i_r5"] + out["loc_auc"]) / 3)
    for key in ("i2t_fact_r1", "t2i_fact_r1", "i2t_fact_zone_r1", "t2i_fact_zone_r1"):
        assert 0.0 <= out[key] <= 1.0 and 0.0 < out[key + "_chance"] <= 1.0, key


def test_fact_recall_in_validation_and_skipped_for_class_maps(tiny_amvlm, caplog, monkeypatch):
    import logging
    from types import SimpleNamespace

    from amvlm_monai.handlers.alignment import AlignmentValidation
    from conftest import REPORTS

    from amvlm_monai.evaluation.alignment import evaluate_alignment

    masks = _hand_masks()
    batches = [{"image": torch.randn(5, 1, 32, 32, generator=torch.Generator().manual_seed(0)), "label": masks,
                "text": [REPORTS[2], REPORTS[2], REPORTS[0], REPORTS[1], REPORTS[1]]}]
    validation = AlignmentValidation(batches, tiny_amvlm)
    engine = SimpleNamespace(state=SimpleNamespace(metrics={}, device="cpu", epoch=1))
    with caplog.at_level(logging.INFO, logger="amvlm_monai.handlers.alignment"):
        validation(engine)
    m = engine.state.metrics
    # 3 distinct reports: that of images 0, 1 states A, that of image 2 B, that of images 3, 4 C
    assert m["val_i2t_fact_r1_chance"] == pytest.approx(1 / 3)
    assert m["val_t2i_fact_r1_chance"] == pytest.approx((2 / 5 + 1 / 5 + 2 / 5) / 3)
    assert f"i2t@1 {m['val_i2t_fact_r1']:.3f} (chance 0.333)" in caplog.text and "count+sides+zones" in caplog.text
    spine = masks.clone()
    spine[2] *= 4  # class indices (MRSpineSeg-like): no region facts, and no crash
    monkeypatch.setattr("amvlm_monai.evaluation.alignment._warned", set())  # the reason is logged once per process
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="amvlm_monai.evaluation.alignment"), \
            caplog.at_level(logging.INFO, logger="amvlm_monai.handlers.alignment"):
        out = evaluate_alignment(tiny_amvlm, [dict(batches[0], label=spine)])
        AlignmentValidation([dict(batches[0], label=spine)], tiny_amvlm)(engine)
    assert math.isnan(out["i2t_fact_r1"]) and math.isnan(out["t2i_fact_zone_r1_chance"])
    assert math.isfinite(out["i2t_r1"]) and math.isfinite(out["alignment"])
    assert caplog.text.count("fact-level recall not computed: labels are not binary") == 1
    assert "same facts n/a (labels not binary)" in caplog.text and math.isnan(engine.state.metrics["val_i2t_fact_r1"])


def test_the_cli_scores_a_checkpoint_on_a_split(tiny_amvlm, demo_data, tmp_path, capsys):
    import json

    from amvlm_monai.handlers.checkpoint import save_pretrained

    from amvlm_monai.evaluation.alignment import main

    ckpt = tmp_path / "amvlm.pt"
    save_pretrained(str(ckpt), tiny_amvlm)
    assert main(["--checkpoint", str(ckpt), "--datalist", str(demo_data / "datalist.json"), "--key", "test"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_images"] == 4 and 0 <= out["loc_auc"] <= 1 and "t2i_r5_chance" in out
    with pytest.raises(SystemExit) as err:
        main(["--checkpoint", str(tmp_path / "missing.pt"), "--datalist", str(demo_data / "datalist.json")])
    assert err.value.code == 2 and "missing.pt" in capsys.readouterr().err


# ---- fact-level retrieval: the retrieved report's image states the same facts as the query's -------------------------

def _hand_masks():
    """Five 32 px masks: facts (count, sides) A A B C C; with zones, images 0 and 1 differ (upper vs lower). Drawn as
    (row, column), returned as the pipelines load PNGs: (W, H)."""
    m = torch.zeros(5, 1, 32, 32)
    m[0, 0, 2:6, 2:6] = 1  # image left = patient's right (side 0), upper zone
    m[1, 0, 26:30, 2:6] = 1  # side 0, lower zone
    m[2, 0, 2:6, 2:6] = 1  # two regions: side 0 upper ...
    m[2, 0, 12:18, 24:28] = 1  # ... and side 2 (patient's left), middle zone
    return m.transpose(-2, -1)  # images 3 and 4 empty


def test_label_facts_by_hand():
    from amvlm_monai.evaluation.alignment import label_facts

    facts = label_facts(_hand_masks())
    assert facts["fact"] == [(1, (0,)), (1, (0,)), (2, (0, 2)), (0, ()), (0, ())]
    assert facts["fact_zone"] == [(1, (0,), (0,)), (1, (0,), (2,)), (2, (0, 2), (0, 1)), (0, (), ()), (0, (), ())]
    assert label_facts(_hand_masks().transpose(-2, -1), transposed=False) == facts  # display layout
    assert label_facts(_hand_masks(), transposed=False)["fact"][:3] == [(1, (0,)), (1, (2,)), (2, (0,))]  # rows as sides
    spine = torch.zeros(2, 1, 32, 32)
    spine[0, 0, 4:8, 4:8], spine[1, 0, 10:14, 10:14] = 1, 3  # class indices: not a binary mask
    with pytest.raises(ValueError, match="not binary"):
        label_facts(spine)


def _hand_case():
    """sim = image_emb @ eye(4): image i's row is its similarity to the 4 distinct reports; images 3, 4 share report 3."""
    from amvlm_monai.evaluation.alignment import label_facts

    image_emb = torch.tensor([[0.1, 0.9, 0.0, 0.0],  # best report 1: not its own, but the same facts A (zone differs)
                              [0.0, 0.2, 0.8, 0.1],  # best report 2: facts B, the image has A -> miss
                              [0.0, 0.0, 0.9, 0.3],  # own report 2: hit
                              [0.5, 0.0, 0.0, 0.4],  # report 0 (A), the image has C -> miss
                              [0.0, 0.0, 0.0, 1.0]])  # own report 3: hit
    return image_emb, torch.eye(4), torch.tensor([0, 1, 2, 3, 3]), label_facts(_hand_masks())


def test_fact_recall_by_hand():
    from amvlm_monai.evaluation.alignment import fact_recall

    img, txt, index, facts = _hand_case()
    out = fact_recall(img, txt, index, facts["fact"])
    assert retrieval_recall(img, txt, index, ks=(1,))["i2t_r1"] == pytest.approx(2 / 5)  # exact pairs: 2 of 5
    assert out["i2t_fact_r1"] == pytest.approx(3 / 5)  # images 0, 2, 4
    # reports with each image's facts: reports 0 and 1 state A, 2 states B, 3 states C
    assert out["i2t_fact_r1_chance"] == pytest.approx((2 / 4 + 2 / 4 + 1 / 4 + 1 / 4 + 1 / 4) / 5)
    # best image per report: 3 (C, report 0 states A: miss), 0 (A: hit), 2 (hit), 4 (hit)
    assert out["t2i_fact_r1"] == pytest.approx(3 / 4)
    assert out["t2i_fact_r1_chance"] == pytest.approx((2 / 5 + 2 / 5 + 1 / 5 + 2 / 5) / 4)
    zone = fact_recall(img, txt, index, facts["fact_zone"], name="fact_zone")
    assert zone["i2t_fact_zone_r1"] == pytest.approx(2 / 5)  # image 0's report-1 neighbour is lower, not upper zone
    assert zone["i2t_fact_zone_r1_chance"] == pytest.approx(1 / 4)  # every image's facts in exactly one report
    assert zone["t2i_fact_zone_r1"] == pytest.approx(2 / 4)
    assert zone["t2i_fact_zone_r1_chance"] == pytest.approx((1 / 5 + 1 / 5 + 1 / 5 + 2 / 5) / 4)
    tied = fact_recall(torch.zeros(5, 4), txt, index, facts["fact"])  # all ties: the lower index ranks first
    assert tied["i2t_fact_r1"] == pytest.approx(2 / 5)  # report 0 (A) for all: images 0, 1
    assert tied["t2i_fact_r1"] == pytest.approx(2 / 4)  # image 0 (A) for all: reports 0, 1
    with pytest.raises(ValueError, match="facts"):
        fact_recall(img, txt, index, facts["fact"][:4])


def _brute_fact_recall(sim, index, facts, k):
    """Independent formulation: loops, Python's stable sort, and chance by enumerating every draw of k candidates."""
    n, u = len(sim), len(sim[0])
    states = [{facts[i] for i in range(n) if index[i] == j} for j in range(u)]  # the facts each report states
    i2t = i2t_chance = 0.0
    for i in range(n):
        best = sorted(range(u), key=lambda j: -sim[i][j])[:k]
        i2t += any(facts[i] in states[j] for j in best)
        draws = list(itertools.combinations(range(u), k))
        i2t_chance += sum(any(facts[i] in states[j] for j in d) for d in draws) / len(draws)
    t2i = t2i_chance = 0.0
    for j in range(u):
        best = sorted(range(n), key=lambda i: -sim[i][j])[:k]
        t2i += any(facts[i] in states[j] for i in best)
        draws = list(itertools.combinations(range(n), k))
        t2i_chance += sum(any(facts[i] in states[j] for i in d) for d in draws) / len(draws)
    return i2t / n, i2t_chance / n, t2i / u, t2i_chance / u


def test_fact_recall_against_loops_and_enumeration():
    from amvlm_monai.evaluation.alignment import fact_recall

    g = torch.Generator().manual_seed(3)
    for trial in range(4):
        img = F.normalize(torch.randn(8, 5, generator=g), dim=1)
        txt = F.normalize(torch.randn(5, 5, generator=g), dim=1)
        index = torch.tensor([0, 1, 1, 2, 3, 3, 4, 4])
        facts = [("x", "y", "z")[int(v)] for v in torch.randint(0, 3, (8,), generator=g)]
        facts[2] = facts[1] if trial % 2 else "w"  # a report whose two images disagree on the facts, or agree
        out = fact_recall(img, txt, index, facts, ks=(1, 2, 3))
        for k in (1, 2, 3):
            want = _brute_fact_recall((img @ txt.T).tolist(), index.tolist(), facts, k)
            got = (out[f"i2t_fact_r{k}"], out[f"i2t_fact_r{k}_chance"], out[f"t2i_fact_r{k}"],
                   out[f"t2i_fact_r{k}_chance"])
            assert got == pytest.approx(want), (trial, k)


def test_fact_recall_is_one_when_aligned_and_can_fail():
    from amvlm_monai.evaluation.alignment import fact_recall, label_facts

    facts = label_facts(_hand_masks())["fact"]
    txt = F.normalize(torch.randn(4, 6, generator=torch.Generator().manual_seed(0)), dim=1)
    index = torch.tensor([0, 1, 2, 3, 3])
    out = fact_recall(txt[index], txt, index, facts)  # every image embedded as its own report
    assert out["i2t_fact_r1"] == out["t2i_fact_r1"] == 1.0
    assert out["i2t_fact_r1_chance"] < 1 and out["t2i_fact_r1_chance"] < 1
    # every image embedded as a report of other facts: no hit in either direction
    wrong = torch.tensor([2, 3, 0, 2, 2])  # A -> B, A -> C, B -> A, C -> B
    out = fact_recall(txt[wrong], txt, index, facts)
    assert out["i2t_fact_r1"] == 0.0 and out["t2i_fact_r1"] <= 1 / 4  # only report 1 (no image embedded as it) may hit


def test_label_facts_read_masks_as_the_pipeline_loads_them(tmp_path):
    """PNG masks come out of the pipelines as (1, W, H): the facts must still be those the report states."""
    import numpy as np
    from PIL import Image

    from amvlm_monai.data.describe import describe_mask
    from amvlm_monai.evaluation.alignment import label_facts
    from amvlm_monai.transforms.pipelines import segmentation_transforms

    mask = np.zeros((32, 48), np.uint8)  # not square: a transposed read would not even have the same shape
    mask[2:8, 36:44] = 255  # image top right: the patient's upper left
    mask[22:30, 4:12] = 255  # image bottom left: the patient's lower right
    Image.fromarray(mask).save(tmp_path / "mask.png")
    Image.fromarray(mask).save(tmp_path / "image.png")
    item = segmentation_transforms((48, 32), labeled=True)({"image": str(tmp_path / "image.png"),
                                                            "label": str(tmp_path / "mask.png"), "text": "x"})
    assert "upper left" in describe_mask(mask) and "lower right" in describe_mask(mask)
    assert item["label"].shape == (1, 48, 32)
    facts = label_facts(item["label"][None])
    assert facts["fact_zone"] == [(2, (0, 2), (0, 2))]


def test_refresh_bn_statistics_averages_training_batches(tiny_amvlm):
    from types import SimpleNamespace

    from amvlm_monai.handlers.alignment import AlignmentValidation
    from conftest import REPORTS

    from amvlm_monai.evaluation.alignment import refresh_bn_statistics

    g = torch.Generator().manual_seed(1)
    batches = [{"image": torch.randn(4, 1, 32, 32, generator=g), "text": REPORTS} for _ in range(3)]
    bn = tiny_amvlm.image_global.mlp[1]
    bn.running_mean.fill_(5.0)  # stale statistics, as after fast-moving training
    momentum_bn = tiny_amvlm.momentum_image_global.mlp[1]
    before = momentum_bn.running_mean.clone()
    tiny_amvlm.eval()
    assert refresh_bn_statistics(tiny_amvlm, batches, max_images=8) == 8  # stops after 2 batches
    assert not tiny_amvlm.training and bn.momentum == 0.1  # mode and momentum restored
    with torch.no_grad():  # by hand: the plain average over the 2 batches of the layer's input batch means / variances
        hidden = [tiny_amvlm.image_global.mlp[0](tiny_amvlm.image_encoder(b["image"]).cls) for b in batches[:2]]
    torch.testing.assert_close(bn.running_mean, sum(h.mean(0) for h in hidden) / 2)
    torch.testing.assert_close(bn.running_var, sum(h.var(0) for h in hidden) / 2)  # unbiased, as BatchNorm keeps it
    torch.testing.assert_close(momentum_bn.running_mean, before)  # momentum copies untouched
    assert refresh_bn_statistics(tiny_amvlm, [], max_images=8) == 0
    torch.testing.assert_close(bn.running_mean, sum(h.mean(0) for h in hidden) / 2)  # no batch: left as they were

    bn.running_mean.fill_(5.0)  # the validation handler refreshes them before it evaluates (and saves)
    labelled = [dict(b, label=torch.zeros(4, 1, 32, 32)) for b in batches]
    engine = SimpleNamespace(state=SimpleNamespace(metrics={}, device="cpu", epoch=1))
    AlignmentValidation(labelled, tiny_amvlm, bn_loader=batches, bn_images=4)(engine)
    torch.testing.assert_close(bn.running_mean, hidden[0].mean(0))
