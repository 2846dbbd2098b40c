"""The bundle as a user runs it: metadata schema, network checks, export, and every workflow end to end."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = sorted(p for p in (ROOT / "bundles").iterdir() if (p / "configs" / "metadata.json").exists())
SCHEMA = Path(__file__).parent / "data" / "meta_schema_20240725.json"
QATA = ROOT / "bundles" / "qata_covid19_cxr_segmentation"
TINY_OVERRIDES = {"preset": "small", "image_size": 32, "unet_size": "light", "batch_size": 4,
                  "unlabeled_batch_size": 4, "num_workers": 0, "amp": False, "max_epochs": 1, "cache_rate": 0.0}
PRETRAIN_TINY = {"image_size": 32, "batch_size": 4, "num_workers": 0, "amp": False, "max_epochs": 1,
                 "cache_rate": 0.0, "network_def#patch_size": 8, "network_def#vit_width": 32,
                 "network_def#vit_depth": 1, "network_def#vit_heads": 2, "network_def#vit_mlp": 64,
                 "network_def#text_layers": 1, "network_def#embed_dim": 16, "network_def#head_hidden": 32,
                 "network_def#pdt_heads": 2}


def _configs(bundle, *names):
    return [str(bundle / "configs" / n) for n in names]


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda p: p.name)
def test_metadata_passes_the_schema_and_files_are_present(bundle):
    from monai.bundle import verify_metadata

    verify_metadata(meta_file=str(bundle / "configs" / "metadata.json"), filepath=str(SCHEMA))
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["schema"].endswith("meta_schema_20240725.json")
    for name in ("LICENSE", "docs/README.md", "docs/data_license.txt", "configs/logging.conf",
                 "configs/train.json", "configs/evaluate.json", "configs/inference.json",
                 "configs/multi_gpu_train.json", "configs/pretrain.json"):
        assert (bundle / name).is_file(), name
    readme = (bundle / "docs" / "README.md").read_text().lower()
    for section in ("description", "data", "preprocessing", "performance", "usage", "system configuration",
                    "limitations", "citation"):
        assert f"# {section}" in readme or f"## {section}" in readme, section


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda p: p.name)
def test_network_def_in_out_and_export(bundle, tmp_path):
    from monai.bundle import ckpt_export, verify_net_in_out
    from monai.bundle.config_parser import ConfigParser

    train = str(bundle / "configs" / "train.json")
    meta = str(bundle / "configs" / "metadata.json")
    verify_net_in_out(net_id="network_def", meta_file=meta, config_file=train, n=1, any=8)
    parser = ConfigParser()
    parser.read_config(train)
    net = parser.get_parsed_content("network_def")
    ckpt = tmp_path / "model.pt"
    torch.save(net.state_dict(), ckpt)
    out = tmp_path / "model.ts"
    ckpt_export(net_id="network_def", filepath=str(out), ckpt_file=str(ckpt), meta_file=meta, config_file=train)
    scripted = torch.jit.load(str(out))
    x = torch.randn(1, parser["in_channels"], 64, 64)
    net.eval()
    assert torch.allclose(scripted(x), net(x), atol=1e-5)


@pytest.fixture(scope="module")
def bundle_copy(tmp_path_factory):
    dst = tmp_path_factory.mktemp("bundle") / QATA.name
    shutil.copytree(QATA, dst, ignore=shutil.ignore_patterns("models", "eval", "predictions"))
    return dst


def _run(bundle, run_id, configs, **overrides):
    from monai.bundle import run

    cwd = os.getcwd()
    os.chdir(bundle)
    try:
        run(run_id=run_id, config_file=_configs(bundle, *configs), meta_file=str(bundle / "configs/metadata.json"),
            logging_file=str(bundle / "configs/logging.conf"), bundle_root=str(bundle), **overrides)
    finally:
        os.chdir(cwd)


def test_stage1_variants_in_one_folder_keep_their_own_states(bundle_copy, demo_data, tmp_path):
    """The paper's stage 1 and the L_mil variant written to one folder: resuming the second must not pick up the
    first's state (it did, and refused with "already trained N epochs", or would have continued the wrong run)."""
    out = tmp_path / "stage1"
    common = dict(PRETRAIN_TINY, dataset_dir=str(demo_data), output_dir=str(out), resume=True)
    _run(bundle_copy, "pretraining", ["pretrain.json"], **common)
    _run(bundle_copy, "pretraining", ["pretrain.json", "variants/pretrain_mil.json"], **common)
    states = sorted(p.name for p in out.glob("*_state_epoch=*.pt"))
    assert states == ["amvlm_mil_state_epoch=1.pt", "amvlm_pretrained_state_epoch=1.pt"]
    first = torch.load(out / "amvlm_pretrained.pt", weights_only=True)["model"]
    second = torch.load(out / "amvlm_mil.pt", weights_only=True)["model"]
    assert any(not torch.equal(first[k], second[k]) for k in first)  # two runs, not one copied


def test_pretrain_train_evaluate_infer_end_to_end(bundle_copy, demo_data, tmp_path):
    from amvlm_monai.evaluation.metrics import read_scores_csv
    from amvlm_monai.networks.amvlm import load_amvlm

    models = bundle_copy / "models"
    _run(bundle_copy, "pretraining", ["pretrain.json"], dataset_dir=str(demo_data), **PRETRAIN_TINY)
    stage1 = load_amvlm(models / "amvlm_pretrained.pt")
    assert stage1.config["embed_dim"] == 16

    _run(bundle_copy, "training", ["train.json"], dataset_dir=str(demo_data), **TINY_OVERRIDES)
    state = torch.load(models / "model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state)  # a plain state dict of network_def

    _run(bundle_copy, "evaluating", ["train.json", "evaluate.json"], dataset_dir=str(demo_data), **TINY_OVERRIDES)
    scores = read_scores_csv(bundle_copy / "eval" / "scores_test.csv")
    n_test = len(json.loads((demo_data / "split_labeled25.json").read_text())["test"])
    assert len(scores["ids"]) == n_test and len(set(scores["ids"])) == n_test
    assert all(0.0 <= d <= 1.0 for d in scores["dice"])

    _check_logs_panels_and_heatmap(bundle_copy, scores, tmp_path)

    images = sorted((demo_data.parent / "raw" / "Test_Folder" / "img").glob("*.png"))
    out_dir = tmp_path / "pred"
    _run(bundle_copy, "inferring", ["inference.json"], input_dir=str(images[0].parent), output_masks_dir=str(out_dir),
         image_size=32, unet_size="light", num_workers=0)
    from PIL import Image

    written = sorted(out_dir.glob("*.png"))
    assert len(written) == len(images)
    src, pred = Image.open(images[0]), Image.open(written[0])
    assert pred.size == src.size and set(pred.getdata()) <= {0, 255}


def _check_logs_panels_and_heatmap(bundle, scores, tmp_path):
    """What the tiny run leaves besides the weights: TensorBoard logs of both stages, evaluation reports and panels,
    and the alignment heat-map and README figures made from them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from amvlm_monai.evaluation.figures import readme_figures
    from amvlm_monai.workflows.export import read_eval_metrics

    models, eval_dir = bundle / "models", bundle / "eval"
    train = EventAccumulator(str(models / "tensorboard"), size_guidance={"images": 0})
    train.Reload()
    tags = train.Tags()
    assert {"train/loss", "train/sup", "train/consistency", "train/tg", "lr/group_0"} <= set(tags["scalars"])
    for net in ("student", "teacher"):  # every metric of both validated networks
        assert {f"validation/{net}_val_mean_dice", f"validation/{net}_val_mean_iou"} <= set(tags["scalars"])
        assert any(t.startswith(f"validation_panels/{net}/") for t in tags["images"])
    assert len(train.Scalars("train/loss")) == len(train.Scalars("lr/group_0")) > 0
    stage1 = EventAccumulator(str(models / "amvlm_pretrained_tensorboard"))
    stage1.Reload()
    stage1_tags = set(stage1.Tags()["scalars"])
    assert {"train/loss", "train/ita", "train/css", "train/icl", "lr/group_0", "lr/group_1"} <= stage1_tags
    assert any(t.startswith("validation/val_") for t in stage1_tags)  # the stage-1 alignment metrics

    metrics, where = read_eval_metrics(eval_dir)
    assert metrics["mean_dice"] == pytest.approx(float(scores["dice"].mean()), abs=1e-6)
    assert f"{len(scores['ids'])} images" in where
    raw = (eval_dir / "val_mean_dice_raw.csv").read_text().splitlines()
    assert len(raw) == len(scores["ids"]) + 1 and (eval_dir / "val_mean_iou_summary.csv").is_file()
    index = json.loads((eval_dir / "panels" / "index.json").read_text())
    assert 0 < len(index) <= 8 and all((eval_dir / "panels" / e["file"]).is_file() for e in index)
    by_id = dict(zip(scores["ids"], scores["dice"]))
    for entry in index:
        assert entry["report"] and entry["dice"] == pytest.approx(by_id[os.path.basename(entry["image"])], abs=1e-6)

    figures = readme_figures(bundle, tmp_path / "figures", prefer="eval")  # the panel and a heat-map of the run
    from PIL import Image

    for path in figures.values():
        w, h = Image.open(path).size
        assert w > 200 and h > 200, path


@pytest.mark.parametrize("variant", ["supervised", "mean_teacher"])
def test_variants_train(bundle_copy, demo_data, variant, tmp_path):
    _run(bundle_copy, "training", ["train.json", f"variants/{variant}.json"], dataset_dir=str(demo_data),
         ckpt_dir=str(tmp_path), **TINY_OVERRIDES)
    assert (tmp_path / "model.pt").is_file()


@pytest.fixture(scope="module")
def light_model(tmp_path_factory):
    """An untrained light U-Net's ``model.pt`` (1 -> 1 channel) and the flags that describe it without
    ``model_info.json``."""
    from amvlm_monai.networks.segmentation import build_segmentation_net

    path = tmp_path_factory.mktemp("light") / "model.pt"
    torch.save(build_segmentation_net(spatial_dims=2, in_channels=1, out_channels=1, size="light").state_dict(), path)
    return path, dict(image_size=32, in_channels=1, out_channels=1, multiclass=False, unet_size="light", threshold=0.5)


def test_inference_on_an_empty_folder_names_it(bundle_copy, light_model, tmp_path):
    (tmp_path / "empty").mkdir()
    model, settings = light_model
    with pytest.raises(Exception) as err:
        _run(bundle_copy, "inferring", ["inference.json"], input_dir=str(tmp_path / "empty"), num_workers=0,
             model_path=str(model), **settings)
    chain, e = [], err.value
    while e is not None:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    assert any("no images found in" in c and "empty" in c for c in chain), chain


def test_bundle_configs_are_generated_from_the_shared_template():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_bundles.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(BUNDLES) == 4
    spine = json.loads((ROOT / "bundles/mrspineseg_spine_mr_segmentation/configs/train.json").read_text())
    assert spine["multiclass"] and spine["out_channels"] == 20 and len(spine["class_prompts"]) == 19


def test_build_rejects_a_setting_no_config_uses(monkeypatch, tmp_path):
    from conftest import load_script

    build = load_script("build_bundles")
    with pytest.raises(ValueError, match="used by no template config: \\['imgae_size'\\]"):
        build.render("x", {"imgae_size": 32})


@pytest.fixture(scope="module")
def spine_bundle(tmp_path_factory):
    src = ROOT / "bundles" / "mrspineseg_spine_mr_segmentation"
    dst = tmp_path_factory.mktemp("spine") / src.name
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("models", "eval", "predictions"))
    return dst


def test_multiclass_spine_bundle_end_to_end(spine_bundle, tmp_path):
    """Both stages and the evaluation on MRSpineSeg-layout volumes: 20 classes, one text prompt per class."""
    from test_mrspineseg import make

    from amvlm_monai.evaluation.metrics import read_scores_csv
    from data_prep.mrspineseg import convert_mrspineseg

    data = tmp_path / "data"
    convert_mrspineseg(make(tmp_path / "src", n_cases=6), data, seed=0)
    _run(spine_bundle, "pretraining", ["pretrain.json"], dataset_dir=str(data), **PRETRAIN_TINY)
    _run(spine_bundle, "training", ["train.json"], dataset_dir=str(data), **TINY_OVERRIDES)
    assert torch.load(spine_bundle / "models" / "model.pt", weights_only=True)["model.2.conv.weight"].shape[1] == 20
    _run(spine_bundle, "evaluating", ["train.json", "evaluate.json"], dataset_dir=str(data), **TINY_OVERRIDES)
    scores = read_scores_csv(spine_bundle / "eval" / "scores_test.csv")
    assert scores["class_names"][:3] == ["S", "L5", "L4"] and scores["dice_per_class"].shape[1] == 19


def test_multi_gpu_overlay_runs_with_gloo_on_two_cpu_processes(bundle_copy, demo_data, tmp_path):
    """The torchrun command of the README, on CPU: gloo backend, each rank its own shard."""
    import subprocess
    import sys

    configs = str(_configs(bundle_copy, "train.json", "variants/mean_teacher.json", "multi_gpu_train.json"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "monai.bundle", "run", "training", "--config_file", configs, "--dataset_dir", str(demo_data),
           "--ckpt_dir", str(tmp_path), "--bundle_root", str(bundle_copy)]
    for key, value in TINY_OVERRIDES.items():
        if value is not None:  # MONAI's command line would drop a None, and the bundles refuse it (bundle_guard)
            cmd += [f"--{key}", repr(value)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=bundle_copy, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "model.pt").is_file()
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state)


@pytest.fixture(scope="module")
def stage1_checkpoint(tmp_path_factory):
    """A tiny stage-1 checkpoint in the layout SavePretrained writes."""
    from conftest import TINY

    from amvlm_monai.networks.amvlm import AMVLM

    torch.manual_seed(0)
    model = AMVLM(**TINY)
    path = tmp_path_factory.mktemp("stage1") / "amvlm_pretrained.pt"
    torch.save({"model": model.state_dict(), "config": model.config}, path)
    return path


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda p: p.name)
def test_check_properties_of_train_and_inference_configs(bundle, demo_data, stage1_checkpoint, tmp_path):
    """The model zoo's property check (monai.bundle ConfigWorkflow.check_properties) on instantiated workflows."""
    from monai.bundle import ConfigWorkflow

    common = dict(meta_file=str(bundle / "configs" / "metadata.json"),
                  logging_file=str(bundle / "configs" / "logging.conf"), bundle_root=str(tmp_path))
    train = ConfigWorkflow(workflow_type="train", config_file=str(bundle / "configs" / "train.json"),
                           dataset_dir=str(demo_data), pretrained_path=str(stage1_checkpoint),
                           **TINY_OVERRIDES, **common)
    train.initialize()
    assert train.check_properties() == []
    images = demo_data.parent / "raw" / "Test_Folder" / "img"
    settings = dict(image_size=32, in_channels=1, out_channels=1, multiclass=False, unet_size="light", threshold=0.5)
    infer = ConfigWorkflow(workflow_type="infer", config_file=str(bundle / "configs" / "inference.json"),
                           dataset_dir=str(images), image_glob=["*.png"], **settings, **common)  # no model_info.json
    infer.initialize()
    assert infer.check_properties() == []
    assert infer.parser.get_parsed_content("input_dir") == str(images)  # --dataset_dir is the images' folder


def test_check_properties_finds_an_inline_key_metric(demo_data, stage1_checkpoint, tmp_path):
    """The check this bundle layout has to pass fails on the former inline key_val_metric."""
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(workflow_type="train", config_file=str(QATA / "configs" / "train.json"),
                        meta_file=str(QATA / "configs" / "metadata.json"), bundle_root=str(tmp_path),
                        dataset_dir=str(demo_data), pretrained_path=str(stage1_checkpoint), **TINY_OVERRIDES)
    wf.parser["validate#evaluator#key_val_metric"] = dict(wf.parser["validate#key_metric"])  # inline, as before
    wf.initialize()
    with pytest.raises(AttributeError):  # MONAI's check expects a reference string there
        wf.check_properties()


@pytest.mark.skipif(__import__("importlib").util.find_spec("mlflow") is not None, reason="mlflow is installed")
def test_tracking_mlflow_without_mlflow_names_the_package_to_install(bundle_copy, demo_data, tmp_path):
    from amvlm_monai.handlers.tracking import MLFLOW_MISSING

    with pytest.raises(Exception) as err:
        _run(bundle_copy, "training", ["train.json", "variants/supervised.json"], dataset_dir=str(demo_data),
             ckpt_dir=str(tmp_path), tracking="mlflow", **TINY_OVERRIDES)
    chain, e = [], err.value
    while e is not None:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    assert MLFLOW_MISSING in chain
    assert not (tmp_path / "model.pt").exists()  # stopped before training


def _cli(bundle, run_id, configs, **overrides):
    """``python -m monai.bundle run`` in a subprocess, as a user runs it; ``--key value`` for each override."""
    import subprocess
    import sys

    files = _configs(bundle, *configs)
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", str(files) if len(files) > 1 else
           files[0], "--bundle_root", str(bundle)]
    for key, value in overrides.items():
        cmd += [f"--{key}", value if isinstance(value, str) else repr(value)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("AMVLM_DEBUG", None)
    return subprocess.run(cmd, cwd=bundle, capture_output=True, text=True, env=env, timeout=600)


def _one_error_line(proc) -> str:
    """The run's only ``error:`` line, after checking exit status 2 and that no traceback was printed."""
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-3000:]
    return lines[0]


def test_command_line_booleans_mean_what_they_say(bundle_copy, demo_data, tmp_path):
    """``--use_text false`` (MONAI's command line passes the string "false") trains a Mean-Teacher without text
    guidance: it runs where no stage-1 checkpoint exists, and the state holds no text-mask decoder;
    ``--tensorboard FALSE`` writes no event files; ``--use_unlabeled True`` keeps the teacher."""
    proc = _cli(bundle_copy, "training", ["train.json"], dataset_dir=str(demo_data), output_dir=str(tmp_path),
                use_text="false", tensorboard="FALSE", use_unlabeled="True", overwrite="yes",
                **{k: v for k, v in TINY_OVERRIDES.items() if k != "preset"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not (tmp_path / "amvlm_pretrained.pt").exists()
    state = torch.load(tmp_path / "train_state_epoch=1.pt", weights_only=True)
    assert "guidance" not in state and "teacher" in state and (tmp_path / "model.pt").is_file()
    assert " consistency: " in proc.stdout and " tg: " not in proc.stdout  # the logged terms: no L_tg
    assert not (tmp_path / "tensorboard").exists()


def test_training_without_its_stage1_checkpoint_names_the_pretraining_command(bundle_copy, demo_data, tmp_path):
    line = _one_error_line(_cli(bundle_copy, "training", ["train.json"], dataset_dir=str(demo_data),
                                output_dir=str(tmp_path), num_workers=0))
    assert line == (f"error: {tmp_path}/amvlm_pretrained.pt: stage-1 checkpoint not found; the pretraining workflow "
                    "writes it: python -m monai.bundle run pretraining --config_file configs/pretrain.json (a variant's: "
                    "add its configs/variants/pretrain_*.json)")
    assert sorted(os.listdir(tmp_path)) == []  # stopped before anything was built


def test_pretraining_that_would_train_nothing_is_an_error(bundle_copy, demo_data, tmp_path):
    """A batch larger than the data with drop_last: MONAI would skip the run and exit 0 having trained nothing."""
    n = len(json.loads((demo_data / "datalist.json").read_text())["training"])
    line = _one_error_line(_cli(bundle_copy, "pretraining", ["pretrain.json"], dataset_dir=str(demo_data),
                                output_dir=str(tmp_path), **dict(PRETRAIN_TINY, batch_size=n + 1)))
    assert line == (f"error: --batch_size: {n + 1} is more than the {n} pretraining items and incomplete batches are "
                    f"dropped (drop_last): no step would run; allowed: an integer from 1 to {n}")
    assert not (tmp_path / "amvlm_pretrained.pt").exists()


def test_inference_on_a_folder_without_images_is_one_line(bundle_copy, light_model, tmp_path):
    (tmp_path / "empty").mkdir()
    model, settings = light_model
    line = _one_error_line(_cli(bundle_copy, "inferring", ["inference.json"], input_dir=str(tmp_path / "empty"),
                                model_path=str(model), output_masks_dir=str(tmp_path / "out"), num_workers=0,
                                **settings))
    assert line == f"error: no images found in {tmp_path / 'empty'}: nothing to process."
