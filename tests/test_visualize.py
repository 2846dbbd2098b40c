"""Pictures and the handlers behind them: overlays, panels, alignment maps, the panel sample, metric details,
the --tracking mlflow message."""

import types

import numpy as np
import pytest
import torch

from amvlm_monai.evaluation import figures as vis


def test_to_display_scales_and_repeats_grey():
    img = torch.tensor([[[-1.0, 0.0], [1.0, 3.0]]])  # (1, 2, 2)
    rgb = vis.to_display(img)
    assert rgb.shape == (2, 2, 3)
    np.testing.assert_allclose(rgb[..., 0], [[0.0, 0.25], [0.5, 1.0]])
    assert np.array_equal(rgb[..., 0], rgb[..., 2])
    colour = vis.to_display(torch.stack([torch.zeros(2, 2), torch.ones(2, 2), torch.zeros(2, 2)]))
    assert colour[0, 0].tolist() == [0.0, 1.0, 0.0]


def test_overlay_colours_only_the_mask():
    rgb = np.zeros((2, 2, 3))
    mask = np.array([[1, 0], [0, 0]])
    out = vis._overlay(rgb, mask, multiclass=False, color=(1.0, 0.0, 0.0), alpha=0.5)
    assert out[0, 0].tolist() == [0.5, 0.0, 0.0]
    assert not out[1].any() and not out[0, 1].any()
    classes = vis._overlay(rgb, np.array([[0, 2], [0, 0]]), multiclass=True, alpha=1.0)
    from matplotlib import colormaps

    assert np.allclose(classes[0, 1], colormaps["tab20"](1)[:3]) and not classes[0, 0].any()


def test_segmentation_panel_has_one_picture_per_given_input():
    img = torch.randn(1, 32, 32)
    lab = torch.zeros(1, 32, 32)
    lab[:, 8:16, 8:16] = 1
    two = vis.segmentation_panel(img, lab)
    four = vis.segmentation_panel(img, lab, lab, torch.rand(1, 32, 32), report="One lesion. " * 20, title="a")
    assert two.dtype == np.uint8 and two.shape[2] == 3
    assert four.shape[1] == 2 * two.shape[1]  # 4 columns vs 2
    assert four.shape[0] > two.shape[0]  # the report's lines under the pictures
    green = (two[..., 1].astype(int) - two[..., 0] > 40) & (two[..., 1].astype(int) - two[..., 2] > 40)
    assert green.sum() > 100  # the ground truth is drawn (an 8x8 square, scaled up)
    plain = vis.segmentation_panel(img)
    assert not ((plain[..., 1].astype(int) - plain[..., 0] > 40).any())
    with pytest.raises(ValueError, match="image must be"):
        vis.segmentation_panel(torch.zeros(1, 1, 1, 4, 4))


def test_alignment_maps_match_an_independent_computation(tiny_amvlm, demo_data):
    from conftest import REPORTS

    from amvlm_monai.evaluation.alignment import alignment_maps
    from amvlm_monai.transforms.pipelines import inference_transforms

    image = str(sorted((demo_data.parent / "raw" / "Test_Folder" / "img").glob("*.png"))[0])
    model = tiny_amvlm.eval()
    maps = alignment_maps(model, image, REPORTS[:3])
    grid = tuple(model.image_encoder.grid_size)
    assert maps["similarity"].shape == (3, *grid) and maps["variance_attended"].shape == (3, *grid)
    with torch.no_grad():
        x = inference_transforms(32)({"image": image})["image"][None].float()
        patches = model.patch_embeddings(x)[0]  # (P, D)
        text = model.text_embeddings(REPORTS[:3])  # (3, D)
        for k in range(3):  # cosine of each patch with the report, one patch at a time
            expect = torch.stack([torch.dot(p, text[k]) for p in patches]).reshape(grid)
            assert torch.allclose(maps["similarity"][k], expect, atol=1e-5)
        img = model.encode_image(x)
        _, sigma = model.pdt_image(img.tokens, img.mask)
        assert torch.allclose(maps["variance_image"], (sigma[0] ** 2).mean(-1).reshape(grid), atol=1e-6)
        # the attended words of report 1 alone give its row
        txt = model.encode_text(model.tokenize([REPORTS[1]]))
        att, _ = model.cross_attend(img, txt)
        _, s_att = model.pdt_attended(att, img.mask)
        assert torch.allclose(maps["variance_attended"][1], (s_att[0] ** 2).mean(-1).reshape(grid), atol=1e-5)
    picture = vis.alignment_figure(maps["image"], maps["reports"], maps["similarity"], maps["variance_image"],
                                   maps["variance_attended"])
    assert picture.ndim == 3 and picture.shape[0] > picture.shape[1]  # a row per report under the image row
    with pytest.raises(ValueError, match="similarity must be"):
        vis.alignment_figure(maps["image"], ["one"], maps["similarity"], maps["variance_image"])


def _engine(batches):
    """A stand-in for an evaluator: ``state.output`` / ``state.batch`` per iteration, as SupervisedEvaluator leaves
    them with decollate=False."""
    for b in batches:
        yield types.SimpleNamespace(state=types.SimpleNamespace(output={k: b[k] for k in ("image", "label", "pred")},
                                                                batch=b))


def _batch(ids, cases=None, fg=None):
    n = len(ids)
    label = torch.zeros(n, 1, 4, 4)
    for i in range(n):
        if fg is None or fg[i]:
            label[i, 0, 0, 0] = 1
    b = {"image": torch.randn(n, 1, 4, 4), "label": label, "pred": torch.randn(n, 1, 4, 4), "id": list(ids),
         "text": [f"report {i}" for i in ids]}
    if cases is not None:
        b["case"] = list(cases)
    return b


def test_panel_sampler_images_are_a_seeded_reproducible_sample():
    from amvlm_monai.handlers.panels import PanelSampler

    batches = [_batch([f"{b}_{i}" for i in range(4)]) for b in range(5)]  # 20 images
    picks = []
    for _ in range(2):
        s = PanelSampler(num_images=6, seed=3)
        for e in _engine(batches):
            s.update(e)
        items = s.items()
        picks.append([r["id"] for r in items])
        assert len(items) == 6 and [r["index"] for r in items] == sorted(r["index"] for r in items)
        assert items[0]["text"] == f"report {items[0]['id']}" and items[0]["image"].shape == (1, 4, 4)
    assert picks[0] == picks[1]
    s = PanelSampler(num_images=6, seed=4)
    for e in _engine(batches):
        s.update(e)
    assert [r["id"] for r in s.items()] != picks[0]  # another seed, another sample (fixed for these seeds)


def test_panel_sampler_volumes_keep_labelled_slices_per_case():
    from amvlm_monai.handlers.panels import PanelSampler

    ids = [f"c{c}_s{i}" for c in range(4) for i in range(5)]
    cases = [f"c{c}" for c in range(4) for _ in range(5)]
    fg = [i % 5 != 0 for i in range(20)]  # slice 0 of each case is unlabelled
    s = PanelSampler(num_images=3, per_case=2, seed=0)
    for e in _engine([_batch(ids[k:k + 5], cases[k:k + 5], fg[k:k + 5]) for k in range(0, 20, 5)]):
        s.update(e)
    items = s.items()
    assert sorted({r["case"] for r in items}) == ["c0", "c1", "c2"]  # the first 3 cases
    assert all(sum(r["case"] == c for r in items) == 2 for c in ("c0", "c1", "c2"))
    assert all(not r["id"].endswith("_s0") for r in items)


def test_render_panels_titles_with_the_image_dice():
    from amvlm_monai.handlers.panels import render_panels

    label = torch.zeros(1, 8, 8)
    label[0, :4] = 1
    logits = torch.full((1, 8, 8), -5.0)
    logits[0, :2] = 5.0  # predicts half of the labelled rows: Dice 2*16/(16+32)
    item = {"image": torch.randn(1, 8, 8), "label": label, "pred": logits, "id": "x", "path": "/a/x.png",
            "text": "r", "index": 0}
    [(info, picture)] = render_panels([item])
    assert info["dice"] == pytest.approx(2 / 3) and info["foreground"] == pytest.approx(0.5)
    assert info["image"] == "/a/x.png" and picture.dtype == np.uint8


def test_segmentation_metric_leaves_per_image_details_for_metrics_saver(tmp_path):
    from amvlm_monai.handlers.metrics import SegmentationMetric
    from ignite.engine import Engine
    from monai.handlers import MetricsSaver

    label = torch.zeros(2, 1, 4, 4)
    label[0, 0, 0] = 1
    logits = torch.where(label > 0, 5.0, -5.0)
    logits[1, 0, 0, 0] = 5.0  # image 2: a false positive on an empty label -> Dice 0

    def step(engine, batch):
        return {"pred": logits, "label": label, "image": None}

    engine = Engine(step)
    SegmentationMetric("dice", output_transform=lambda o: (o["pred"], o["label"], ["a.png", "b.png"])).attach(
        engine, "val_mean_dice")
    MetricsSaver(str(tmp_path), metrics="*", metric_details="*",
                 batch_transform=lambda b: [{"filename_or_obj": "a.png"}, {"filename_or_obj": "b.png"}]
                 ).attach(engine)
    engine.run([0], max_epochs=1)
    assert engine.state.metric_details["val_mean_dice"].tolist() == [[1.0], [0.0]]
    raw = (tmp_path / "val_mean_dice_raw.csv").read_text().splitlines()
    assert raw[0] == "filename,class0,mean" and raw[1].startswith("a.png,1.0") and raw[2].startswith("b.png,0.0")
    assert (tmp_path / "metrics.csv").read_text().strip() == "val_mean_dice,0.5"


def test_mlflow_tracking_without_mlflow_says_what_to_install(monkeypatch):
    import importlib.util

    from amvlm_monai.handlers import tracking as handlers

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install 'amvlm-monai\[mlflow\]'"):
        handlers.mlflow_is_not_rank0()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "mlflow" else real(name, *a))
    assert handlers.mlflow_is_not_rank0() is False  # not distributed: rank 0


def test_tensorboard_handler_logs_terms_lr_and_the_validators_metrics_and_panels(tmp_path):
    """The evaluator of MONAI's ValidationHandler, given with evaluator_metrics: its metrics and panels are logged at
    the trainer's epoch, panels tagged with the name of the network it validated."""
    from amvlm_monai.handlers.metrics import SegmentationMetric
    from amvlm_monai.handlers.tracking import TensorBoardHandler
    from ignite.engine import Engine
    from monai.engines import SupervisedEvaluator
    from monai.handlers import ValidationHandler
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    net = torch.nn.Conv2d(1, 1, 3, padding=1)
    data = [{"image": torch.randn(2, 1, 8, 8), "label": (torch.rand(2, 1, 8, 8) > 0.5).float(), "id": ["a", "b"],
             "text": ["r a", "r b"]}]
    evaluator = SupervisedEvaluator(device="cpu", val_data_loader=data, network=net, decollate=False,
                                    key_val_metric={"val_mean_dice": SegmentationMetric("dice")})
    opt = torch.optim.SGD([{"params": net.parameters(), "lr": 0.1}, {"params": [], "lr": 0.01}])

    def step(engine, batch):
        return {"loss": 1.0 / engine.state.iteration, "sup": 2.0, "label": "not a scalar"}

    trainer = Engine(step)
    ValidationHandler(validator=evaluator, interval=1, epoch_level=True).attach(trainer)
    TensorBoardHandler(str(tmp_path), optimizer=opt, evaluator=evaluator, evaluator_metrics=True, num_panels=2,
                       networks={"other": torch.nn.Identity(), "student": net}).attach(trainer)
    trainer.run([0, 1, 2], max_epochs=2)
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"train/loss", "train/sup", "lr/group_0", "lr/group_1", "validation/val_mean_dice"} <= set(tags["scalars"])
    assert "train/label" not in tags["scalars"]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([1, 1 / 2, 1 / 3, 1 / 4, 1 / 5, 1 / 6])
    assert [e.step for e in acc.Scalars("validation/val_mean_dice")] == [1, 2]  # the trainer's epoch
    assert sorted(tags["images"]) == ["validation_panels/student/a", "validation_panels/student/b"]
    assert [e.step for e in acc.Images("validation_panels/student/a")] == [1, 2]


def test_panel_shows_a_png_the_way_round_the_file_is(tmp_path):
    """MONAI loads a W x H PNG as (1, W, H); the panel transposes it back: a lesion at the file's top right (rows
    2-7, columns 40-55 of a 64 wide, 32 high image) is drawn at the picture's top right."""
    from PIL import Image

    from amvlm_monai.transforms.pipelines import segmentation_transforms

    img = np.zeros((32, 64), np.uint8)
    img[2:8, 40:56] = 255
    Image.fromarray(img).save(tmp_path / "i.png")
    Image.fromarray(img).save(tmp_path / "m.png")
    item = segmentation_transforms((64, 32), with_text=False)({"image": str(tmp_path / "i.png"),
                                                               "label": str(tmp_path / "m.png")})
    assert tuple(item["image"].shape) == (1, 64, 32)  # x first
    pic = vis.segmentation_panel(item["image"], item["label"])
    green = (pic[..., 1].astype(int) - pic[..., 0] > 40) & (pic[..., 1].astype(int) - pic[..., 2] > 40)
    half = pic.shape[1] // 2  # the second picture (ground truth) is the right half
    drawn = np.nonzero(pic[:, half:].max(axis=-1) < 200)  # the (mostly black) image on the white figure
    top, bottom, left, right = drawn[0].min(), drawn[0].max(), drawn[1].min(), drawn[1].max()
    assert (right - left) > 1.6 * (bottom - top)  # wider than high, as the file
    rows, cols = np.nonzero(green[:, half:])
    assert (rows.mean() - top) / (bottom - top) < 0.3 and (cols.mean() - left) / (right - left) > 0.6
    flipped = vis.segmentation_panel(item["image"], item["label"], xy=False)
    assert not np.array_equal(flipped, pic)


def test_handlers_attach_once(tmp_path):
    """Attaching a handler twice (a config that lists it twice, or a workflow that attaches it again) runs it once."""
    from ignite.engine import Engine

    from amvlm_monai.handlers.selection import SelectBestModel

    calls = []

    class Counting(SelectBestModel):
        def __call__(self, engine):
            calls.append(engine.state.epoch)

    handler = Counting(validator=None, networks={"student": torch.nn.Identity()}, save_dir=str(tmp_path))
    trainer = Engine(lambda e, b: None)
    handler.attach(trainer)
    handler.attach(trainer)
    trainer.run([0], max_epochs=2)
    assert calls == [1, 2]


@pytest.mark.parametrize("overwrite, resume, kept", [(True, False, False), (True, True, True), (False, False, True)])
def test_overwrite_starts_a_fresh_tensorboard_run(tmp_path, overwrite, resume, kept):
    from ignite.engine import Engine

    from amvlm_monai.handlers.tracking import TensorBoardHandler

    old = tmp_path / "events.out.tfevents.1.earlier"
    old.write_bytes(b"an earlier run")
    other = tmp_path / "notes.txt"
    other.write_text("not an event file")
    TensorBoardHandler(str(tmp_path), num_panels=0, overwrite=str(overwrite).lower(), resume=resume).attach(
        Engine(lambda e, b: None))
    assert old.exists() == kept and other.exists()
