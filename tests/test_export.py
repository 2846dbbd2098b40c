"""The stand-alone bundle: export it, then verify it and infer with it in an environment without amvlm_monai."""

import hashlib
import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch
from test_bundle import QATA, SCHEMA, TINY_OVERRIDES, _run

NETWORK = {"spatial_dims": 2, "in_channels": 1, "out_channels": 1, "size": TINY_OVERRIDES["unet_size"]}
METRICS = {"val_mean_dice": 0.625, "val_mean_iou": 0.5}

CHECKS = r"""
import sys
b, schema, images, out = sys.argv[1:5]
try:
    import amvlm_monai
except ModuleNotFoundError:
    pass
else:
    sys.exit(f"amvlm_monai is importable from {amvlm_monai.__file__}: not a clean environment")
from monai.bundle import ConfigWorkflow, ckpt_export, run, verify_metadata, verify_net_in_out

meta, infer, log = f"{b}/configs/metadata.json", f"{b}/configs/inference.json", f"{b}/configs/logging.conf"
verify_metadata(meta_file=meta, filepath=schema)
verify_net_in_out(net_id="network_def", meta_file=meta, config_file=infer, bundle_root=b)
ckpt_export(net_id="network_def", filepath=f"{out}/model.ts", ckpt_file=f"{b}/models/model.pt", meta_file=meta,
            config_file=infer, bundle_root=b)
print("AMVLM BEFORE INFERRING", sorted(m for m in sys.modules if "amvlm" in m))
run(run_id="inferring", config_file=infer, meta_file=meta, logging_file=log, bundle_root=b, input_dir=images,
    output_masks_dir=f"{out}/pred", num_workers=0)
wf = ConfigWorkflow(workflow_type="infer", config_file=infer, meta_file=meta, logging_file=log, bundle_root=b,
                    dataset_dir=images)
wf.initialize()
print("PROPERTIES", wf.check_properties())
print("AMVLM AFTER", sorted(m for m in sys.modules if m.split(".")[0] == "amvlm_monai"))
print("SCRIPTS", "scripts.amvlm_monai.transforms.pipelines" in sys.modules)
"""


def clean_python(root: Path) -> Path:
    """A venv without pip whose site-packages reach this one's through a .pth file: the installed packages are
    there, the editable install of amvlm_monai is not (.pth files inside a folder added by a .pth file are not
    processed, so its finder never runs)."""
    env = root / "clean-env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    site = next((env / "lib").glob("python*/site-packages"))
    (site / "this_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return env / "bin" / "python"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from ignite.engine import Engine
    from monai.handlers import MetricsSaver

    from amvlm_monai.io.model_info import make_model_info, write_model_info
    from amvlm_monai.networks.segmentation import build_segmentation_net
    from amvlm_monai.workflows.export import export_bundle

    work = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    net = build_segmentation_net(**NETWORK)
    models = work / "run" / "models"
    models.mkdir(parents=True)
    torch.save(net.state_dict(), models / "model.pt")
    write_model_info(models / "model_info.json", make_model_info(NETWORK, image_size=32))  # as training writes it
    # the evaluation output as the 'evaluating' workflow's MetricsSaver writes it
    from ignite.engine import Events

    engine = Engine(lambda e, b: None)
    engine.add_event_handler(Events.STARTED, lambda e: e.state.metrics.update(METRICS))
    MetricsSaver(str(work / "run" / "eval"), metrics=list(METRICS)).attach(engine)
    engine.run([0], max_epochs=1)
    written = export_bundle(QATA.name, models, work / "dist")  # the settings come from model_info.json
    return {"work": work, "net": net.eval(), **written}


def test_export_layout_metadata_and_zip(exported):
    b = exported["folder"]
    meta = json.loads((b / "configs" / "metadata.json").read_text())
    assert meta["eval_metrics"] == {"mean_dice": 0.625, "mean_iou": 0.5}
    assert "evaluation of these weights" in meta["description"] and "to be filled" not in meta["description"]
    packages = meta["required_packages_version"]
    assert "amvlm-monai" not in packages and {"transformers", "pytorch-ignite", "pillow"} <= set(packages)
    import importlib.metadata

    for dist, version in packages.items():  # every entry is a registry distribution installed at that version
        assert importlib.metadata.version(dist) == version, dist
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [32, 32]
    infer = json.loads((b / "configs" / "inference.json").read_text())
    assert infer["network_def"]["_target_"] == "UNet" and infer["image_size"] in (32, [32, 32])
    assert (b / "models" / "model_info.json").is_file()
    for path in (b / "configs").rglob("*.json"):
        text = path.read_text().replace("scripts.amvlm_monai.", "")
        assert "amvlm_monai." not in text, path
    train = json.loads((b / "configs" / "train.json").read_text())
    assert train["network_def"]["_target_"] == "scripts.amvlm_monai.networks.segmentation.build_segmentation_net"
    code = (b / "scripts" / "amvlm_monai" / "engines" / "mean_teacher.py").read_text()
    assert "from scripts.amvlm_monai.engines.pretrainer import batch_names" in code
    large = (b / "large_files.yml").read_text()
    assert 'path: "models/model.pt"' in large
    assert hashlib.md5((b / "models" / "model.pt").read_bytes()).hexdigest() in large
    with zipfile.ZipFile(exported["zip"]) as z:
        names = set(z.namelist())
    name = b.name
    for rel in ("configs/metadata.json", "configs/inference.json", "scripts/amvlm_monai/__init__.py",
                "models/model.pt", "large_files.yml", "LICENSE", "docs/README.md"):
        assert f"{name}/{rel}" in names, rel


def test_exported_bundle_runs_without_the_package(exported, demo_data, tmp_path):
    """verify_metadata, verify_net_in_out, ckpt_export, inferring and check_properties in a clean environment; the
    masks equal those of this repository's bundle with the same weights."""
    import shutil

    import numpy as np
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for p in sorted((demo_data.parent / "raw" / "Test_Folder" / "img").glob("*.png"))[:3]:
        shutil.copy(p, images / p.name)
    python = clean_python(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="2", AMVLM_PROGRESS="log")
    probe = subprocess.run([str(python), "-c", "import amvlm_monai"], cwd=tmp_path, env=env, capture_output=True,
                           text=True)
    assert probe.returncode != 0 and "No module named 'amvlm_monai'" in probe.stderr
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run([str(python), "-c", CHECKS, str(exported["folder"]), str(SCHEMA), str(images), str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "AMVLM BEFORE INFERRING []" in proc.stdout  # metadata, shape and TorchScript checks need MONAI only
    assert "PROPERTIES []" in proc.stdout and "AMVLM AFTER []" in proc.stdout and "SCRIPTS True" in proc.stdout

    scripted = torch.jit.load(str(out / "model.ts"))
    x = torch.randn(1, 1, 32, 32)
    assert torch.allclose(scripted(x), exported["net"](x), atol=1e-5)

    here = tmp_path / "repo_bundle"
    shutil.copytree(QATA, here, ignore=shutil.ignore_patterns("models", "eval", "predictions"))
    (here / "models").mkdir()
    shutil.copy(exported["folder"] / "models" / "model.pt", here / "models" / "model.pt")
    shutil.copy(exported["folder"] / "models" / "model_info.json", here / "models" / "model_info.json")
    _run(here, "inferring", ["inference.json"], input_dir=str(images), output_masks_dir=str(tmp_path / "pred_repo"),
         num_workers=0)
    theirs = sorted((out / "pred").glob("*.png"))
    ours = sorted((tmp_path / "pred_repo").glob("*.png"))
    assert [p.name for p in theirs] == [p.name for p in ours] and len(theirs) == 3
    for a, b in zip(theirs, ours):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


def test_export_refuses_weights_of_other_settings_and_missing_evaluation(exported, tmp_path):
    from amvlm_monai.workflows.export import export_bundle

    models = exported["work"] / "run" / "models"
    with pytest.raises(ValueError, match="do not fit.*--set"):
        export_bundle(QATA.name, models, tmp_path / "a", overrides={"image_size": 32, "out_channels": 2})
    with pytest.raises(ValueError, match="used by no config.*imgae_size"):
        export_bundle(QATA.name, models, tmp_path / "b", overrides={"imgae_size": 32})
    with pytest.raises(FileNotFoundError, match="no evaluation results"):
        export_bundle(QATA.name, models, tmp_path / "c", eval_dir=tmp_path)


def test_monai_network_def_records_the_constructor_call():
    from monai.networks.nets import BasicUNet

    from amvlm_monai.networks.segmentation import build_segmentation_net
    from amvlm_monai.workflows.export import monai_network_def

    spec = monai_network_def(lambda: build_segmentation_net(channels=(4, 8, 16), strides=(2, 2), norm="instance"))
    assert spec["_target_"] == "UNet" and spec["channels"] == [4, 8, 16] and spec["norm"] == "instance"
    spec = monai_network_def(lambda: BasicUNet(spatial_dims=2, features=(4, 4, 8, 8, 16, 4)))
    assert spec["_target_"] == "BasicUNet" and spec["features"] == [4, 4, 8, 8, 16, 4]
    assert monai_network_def(lambda: torch.nn.Conv2d(1, 1, 1)) is None


def test_read_eval_metrics_falls_back_to_the_per_image_scores(tmp_path):
    from amvlm_monai.evaluation.metrics import write_scores_csv
    from amvlm_monai.workflows.export import read_eval_metrics

    write_scores_csv(tmp_path / "scores_test.csv", ["a", "b", "c"], torch.tensor([[1.0], [0.5], [0.0]]),
                     torch.tensor([[1.0], [0.25], [0.5]]))
    metrics, where = read_eval_metrics(tmp_path)
    assert metrics == pytest.approx({"mean_dice": 0.5, "mean_iou": 0.58333333})
    assert "'test' split, 3 images" in where
    (tmp_path / "metrics.csv").write_text("val_mean_dice,0.75\nval_mean_iou,0.6\n")  # MetricsSaver's wins
    assert read_eval_metrics(tmp_path)[0] == {"mean_dice": 0.75, "mean_iou": 0.6}


def test_settings_read_from_beside_the_weights_are_written_into_the_export(tmp_path):
    """Configs that read the model's settings from a JSON beside model.pt get them as values in the export."""
    from amvlm_monai.workflows.export import _freeze

    (tmp_path / "model_info.json").write_text(json.dumps({"image_size": 48, "unet_size": None}))
    config = {"imports": ["$import json"], "bundle_root": ".", "output_dir": "$@bundle_root + '/models'",
              "model_info": "$json.load(open(@output_dir + '/model_info.json'))",
              "image_size": "$@model_info['image_size']", "unet_size": "$@model_info['unet_size']", "in_channels": 1}
    frozen = _freeze(config, tmp_path / "model.pt")
    assert frozen["image_size"] == 48 and frozen["unet_size"] is None and frozen["in_channels"] == 1
    assert frozen["output_dir"] == config["output_dir"]  # the export's own paths stay relative to its root
