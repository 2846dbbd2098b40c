"""The stand-alone bundle: export it, then verify it and infer with it in an environment without amvlm_monai."""

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
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
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(models / "tensorboard")) as writer:  # a stage-2 log 1 h 02 min long
        for step, t in enumerate((1.0e9, 1.0e9 + 1800, 1.0e9 + 3720)):
            writer.add_scalar("train/loss", 1.0 / (step + 1), step, walltime=t)
    server = work / "server"  # where the weights are "uploaded": large_files.yml points at it
    written = export_bundle(QATA.name, models, work / "dist", weights_url=server.as_uri())  # settings: model_info.json
    server.mkdir()
    for name in ("model.pt", "model.ts"):
        shutil.copy(written["folder"] / "models" / name, server / name)
    return {"work": work, "net": net.eval(), "server": server, **written}


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
    assert "model_info" not in infer and "model_defaults" not in infer  # the settings are stated, nothing reads them
    assert (b / "models" / "model_info.json").is_file()
    for path in (b / "configs").rglob("*.json"):
        text = path.read_text().replace("scripts.amvlm_monai.", "")
        assert "amvlm_monai." not in text, path
    train = json.loads((b / "configs" / "train.json").read_text())
    assert train["network_def"]["_target_"] == "scripts.amvlm_monai.networks.segmentation.build_segmentation_net"
    code = (b / "scripts" / "amvlm_monai" / "engines" / "mean_teacher.py").read_text()
    assert "from scripts.amvlm_monai.engines.pretrainer import batch_names" in code
    assert {"fire", "jsonschema", "pyyaml"} <= set(packages)  # python -m monai.bundle, verify_metadata, the yml
    large = yaml.safe_load((b / "large_files.yml").read_text())["large_files"]
    assert [f["path"] for f in large] == ["models/model.pt", "models/model.ts"]
    for entry in large:  # the zoo's fields; the hash of the file the URL serves
        name = entry["path"].split("/")[1]
        assert entry["url"] == (exported["server"] / name).as_uri() and entry["hash_type"] == "sha256"
        assert entry["hash_val"] == hashlib.sha256((exported["server"] / name).read_bytes()).hexdigest()
    # train.json describes the exported network, so the README's ckpt_export (on train.json) exports these weights
    assert train["unet_size"] == "light" and train["image_size"] in (32, [32, 32])
    with zipfile.ZipFile(exported["zip"]) as z:
        names = set(z.namelist())
    name = b.name
    for rel in ("configs/metadata.json", "configs/inference.json", "scripts/amvlm_monai/__init__.py",
                "models/model.pt", "models/model.ts", "large_files.yml", "LICENSE", "docs/README.md"):
        assert f"{name}/{rel}" in names, rel


def test_exported_bundle_runs_without_the_package(exported, demo_data, tmp_path):
    """verify_metadata, verify_net_in_out, ckpt_export, inferring and check_properties in a clean environment; the
    masks equal those of this repository's bundle with the same weights."""
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
    shipped = torch.jit.load(str(exported["folder"] / "models" / "model.ts"))  # the export's own TorchScript
    assert torch.allclose(shipped(x), exported["net"](x), atol=1e-5)

    # the README's ckpt_export command (on train.json), as written, from the bundle folder
    copy = tmp_path / "bundle_copy"
    shutil.copytree(exported["folder"], copy)
    (copy / "models" / "model.ts").unlink()
    line = next(c for c in readme_commands(copy / "docs" / "README.md") if " ckpt_export " in c)
    assert "--config_file configs/train.json" in line
    proc = subprocess.run([str(python)] + shlex.split(line)[1:], cwd=copy, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert torch.allclose(torch.jit.load(str(copy / "models" / "model.ts"))(x), exported["net"](x), atol=1e-5)

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


# ---- the exported README -----------------------------------------------------------------------------------------
def readme_commands(readme: Path) -> list[str]:
    """The command lines of a README's code blocks (comments and blank lines left out)."""
    blocks = re.findall(r"```(?:bash)?\n(.*?)```", readme.read_text(), re.DOTALL)
    return [line.strip() for block in blocks for line in block.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def test_exported_readme_has_the_zoo_sections_and_names_only_what_the_bundle_ships(exported):
    b = exported["folder"]
    readme = (b / "docs" / "README.md").read_text()
    for heading in ("### **Authors**", "### **Tags**", "## **Model Description**", "## **Data**",
                    "#### **Preprocessing**", "#### **Input**", "#### **Output**", "## **Performance**",
                    "## **MONAI Bundle Commands**", "## **System Configuration**", "## **Limitations**",
                    "## **Citation Info**", "## **References**", "## **License**"):
        assert heading in readme, heading
    assert "These weights: mean dice 0.625, mean iou 0.5." in readme
    assert "Training time: stage 2 (training) 1 h 02 min" in readme  # from the TensorBoard log's wall times
    assert "`UNet` (unet_size \"light\"), 1 -> 1 channels, 32 x 32 px" in readme
    assert "1 channel of 32 x 32 float32, values in [-1, 1]" in readme and "Apache License 2.0" in readme
    # nothing of the repository: no converter, no amvlm_monai module, no make target, no repo-only block
    assert not re.search(r"(?<![\w.])(data_prep|amvlm_monai)\.|make demo|repo-only", readme)
    commands = readme_commands(b / "docs" / "README.md")
    assert len(commands) >= 8
    for line in commands:
        words = shlex.split(line)
        start = words.index("-m")
        assert words[0] in ("python", "torchrun") and words[start + 1] == "monai.bundle", line
        action = words[start + 2]
        assert action in ("run", "download_large_files", "verify_net_in_out", "ckpt_export"), line
        configs = [c for i, w in enumerate(words) if w in ("--config_file", "--meta_file") for c in
                   (yaml.safe_load(words[i + 1]) if words[i + 1].startswith("[") else [words[i + 1]])]
        for config in configs:  # every file it names is in the bundle
            assert (b / config).is_file(), (line, config)
        if action == "run":  # and the workflow it runs is defined there
            merged = {}
            for config in configs:
                if config != "configs/metadata.json":
                    merged.update(json.loads((b / config).read_text()))
            assert words[start + 3] in merged, line


def test_readme_sections_drop_repo_only_blocks_and_a_repository_command_is_refused(tmp_path):
    from amvlm_monai.workflows.export import export_readme, readme_sections

    text = ("# T\n\n## Data\nkept\n<!-- repo-only -->\n```bash\npython -m data_prep.qata --src a\n```\n"
            "<!-- /repo-only -->\nalso kept <!-- repo-only -->(not this)<!-- /repo-only --> end\n"
            "## **Limitations**\nL\n")
    assert readme_sections(text) == {"data": "kept\nalso kept  end", "limitations": "L"}
    source = tmp_path / "README.md"
    source.write_text("## Data\nConvert: `python -m data_prep.qata --src a`\n")
    meta = {"name": "N", "network_data_format": {}}
    with pytest.raises(ValueError, match=r"README.md: its 'data' section names 'data_prep.qata'.*repo-only"):
        export_readme(source, meta, "", None, 1.0, "/data")
    source.write_text("## Data\nRead with `scripts.amvlm_monai.data.datalist`.\n")  # the shipped copy is fine
    assert "scripts.amvlm_monai.data.datalist" in export_readme(source, meta, "", None, 1.0, "/data")


def test_weights_urls_from_a_folder_or_a_template():
    from amvlm_monai.workflows.export import weights_urls

    folder = {"model.pt": "https://h.org/w/model.pt", "model.ts": "https://h.org/w/model.ts"}
    assert weights_urls("https://h.org/w") == weights_urls("https://h.org/w/") == folder
    assert weights_urls("file:///srv/w/", ["model.pt"]) == {"model.pt": "file:///srv/w/model.pt"}
    assert weights_urls("https://h.org/{bundle}_v{version}_{name}", ["model.pt"], "b", "0.2.0") == \
        {"model.pt": "https://h.org/b_v0.2.0_model.pt"}
    assert "TO BE FILLED" in weights_urls(None)["model.ts"]
    with pytest.raises(ValueError, match="not an http"):
        weights_urls("/srv/weights")
    with pytest.raises(ValueError, match=r"\{name\}, \{bundle\} and \{version\} only"):
        weights_urls("https://h.org/{nme}")
    with pytest.raises(ValueError, match=r"needs \{name\}"):
        weights_urls("https://h.org/{bundle}.pt", bundle="b")


def test_export_without_a_url_warns_how_to_add_one(exported, tmp_path, capsys, caplog):
    from amvlm_monai.workflows.export import main

    models = exported["work"] / "run" / "models"
    with caplog.at_level("WARNING"):
        assert main(["--bundle", QATA.name, "--model-dir", str(models), "--out", str(tmp_path),
                     "--training-time", "2 h on one GPU"]) == 0
    assert "large_files.yml has placeholder URLs" in caplog.text and "--weights-url" in caplog.text
    b = tmp_path / QATA.name
    assert "TO BE FILLED" in (b / "large_files.yml").read_text()
    assert "Training time: 2 h on one GPU" in (b / "docs" / "README.md").read_text()
    assert main(["--bundle", QATA.name, "--model-dir", str(models), "--out", str(tmp_path / "x"),
                 "--weights-url", "weights/"]) == 2
    assert "not an http(s), ftp or file:// URL" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # refused before writing


def test_training_time_sums_each_log_file(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from amvlm_monai.workflows.export import training_time

    assert training_time(tmp_path) is None
    for folder, spans in (("amvlm_pretrained_tensorboard", [(0, 600)]), ("tensorboard", [(0, 1800), (9000, 9300)])):
        for i, (a, b) in enumerate(spans):  # a resumed run writes a second file; the pause between is not counted
            with SummaryWriter(str(tmp_path / folder / f"run{i}")) as w:
                w.add_scalar("x", 0.0, 0, walltime=1e9 + a)
                w.add_scalar("x", 1.0, 1, walltime=1e9 + b)
    assert training_time(tmp_path).startswith("stage 1 (pretraining) 10 min, stage 2 (training) 35 min; 45 min in all")


# ---- the model zoo's CI, in an environment made from the metadata alone ----------------------------------------------
# A mirror of Project-MONAI/model-zoo ci/verify_bundle.py `verify(bundle, mode="full")` (its steps in order, named
# after its functions) with the large files fetched as its ci/utils.py `download_large_files` fetches them. Offline
# differences: the schema is the file the metadata names (prepare_schema.py downloads it to eval/schema.json), and the
# zoo's models/model_info.json (released versions) is not here, so verify_version_changes checks the changelog only.
ZOO_VERIFY = r"""
import json, os, sys
import torch
from monai.apps.utils import download_url
from monai.bundle import ckpt_export, verify_metadata, verify_net_in_out
from monai.bundle.config_parser import ConfigParser

bundle_path, schema = sys.argv[1:3]
try:
    import amvlm_monai
except ModuleNotFoundError:
    pass
else:
    sys.exit(f"amvlm_monai is importable from {amvlm_monai.__file__}: not a clean environment")
sys.path = [bundle_path] + sys.path  # verify(): "add bundle path to ensure custom code can be used"

# verify_bundle_directory(): download large files (ci/utils.py download_large_files), then the files it requires
parser = ConfigParser()
parser.read_config(os.path.join(bundle_path, "large_files.yml"))
for lf_data in parser.get()["large_files"]:
    lf_data["fuzzy"] = True
    for key in ("hash_val", "hash_type"):
        if key in lf_data and lf_data.get(key, "") == "":
            lf_data.pop(key)
    lf_data["filepath"] = os.path.join(bundle_path, lf_data.pop("path"))
    download_url(**lf_data)
for file in ("configs/metadata.json", "LICENSE", "models/model.pt", "configs/inference.json"):
    if not os.path.exists(os.path.join(bundle_path, file)):
        raise ValueError(f"necessary file {file} is not existing.")
# verify_version_changes()
meta_file = os.path.join(bundle_path, "configs/metadata.json")
metadata = json.load(open(meta_file))
assert metadata["version"] in metadata["changelog"], "version number is missing in 'changelog'"
# verify_metadata_format()
verify_metadata(meta_file=meta_file, filepath=schema)
# verify_bundle_properties(): only for the apps of supported_apps that have a bundle_properties.py in the zoo
assert not metadata.get("supported_apps"), metadata.get("supported_apps")
# verify_data_shape()
config_file = os.path.join("configs", "inference.json")
verify_net_in_out(net_id="network_def", meta_file=meta_file, config_file=os.path.join(bundle_path, config_file),
                  bundle_root=bundle_path)
# verify_torchscript()
ckpt_export(net_id="network_def", filepath=os.path.join(bundle_path, "models/verify_model.ts"),
            ckpt_file=os.path.join(bundle_path, "models", "model.pt"), meta_file=meta_file,
            config_file=os.path.join(bundle_path, config_file), bundle_root=bundle_path)
torch.jit.load(os.path.join(bundle_path, "models", "model.ts"))
# and every config file loads (the zoo's ci/unit_tests run them; here: they parse)
for root, _, files in os.walk(os.path.join(bundle_path, "configs")):
    for f in files:
        if f.endswith(".json"):
            ConfigParser.load_config_file(os.path.join(root, f))
print("ZOO VERIFY OK")
"""

# pip's words for a registry it cannot reach (as against a package or version the registry does not have)
UNREACHABLE = ("NewConnectionError", "Failed to establish a new connection", "Temporary failure in name resolution",
               "Network is unreachable", "ProxyError", "ConnectTimeoutError", "Read timed out", "Could not fetch URL")


def zoo_requirements(meta: dict) -> list[str]:
    """What the zoo's ci/get_bundle_requirements.py `get_requirements` installs for a bundle: monai, torch and numpy
    at the metadata's versions, then every optional_packages_version and required_packages_version entry."""
    libs = [f"monai=={meta['monai_version']}", f"torch=={meta['pytorch_version']}", f"numpy=={meta['numpy_version']}"]
    for key in ("optional_packages_version", "required_packages_version"):
        libs += [f"{name}=={version}" for name, version in meta.get(key, {}).items()]
    return libs


@pytest.fixture(scope="module")
def zoo_python(exported, tmp_path_factory):
    """A fresh venv with torch, then the exported metadata's packages, from pip: nothing of this environment or
    repository. Skipped when pip cannot reach the registry; removed afterwards (it is over 2 GB)."""
    meta = json.loads((exported["folder"] / "configs" / "metadata.json").read_text())
    root = tmp_path_factory.mktemp("zoo_venv")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    python = venv / "bin" / "python"
    (root / "requirements.txt").write_text("\n".join(zoo_requirements(meta)) + "\n")
    try:
        for args in (["torch==" + meta["pytorch_version"]], ["-r", str(root / "requirements.txt")]):
            proc = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-compile", *args], cwd=root,
                                  env=env, capture_output=True, text=True, timeout=900)
            out = proc.stdout + proc.stderr
            if proc.returncode != 0:
                if any(word in out for word in UNREACHABLE):
                    pytest.skip(f"pip cannot reach the package registry: {out.strip().splitlines()[-1]}")
                pytest.fail(f"pip install {' '.join(args)} failed:\n{out[-4000:]}")
        yield python, env
    finally:  # in the background: tens of thousands of files
        subprocess.Popen(["rm", "-rf", str(root)], start_new_session=True, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)


@pytest.mark.slow
def test_zoo_ci_passes_in_a_venv_made_from_the_metadata(exported, zoo_python, tmp_path):
    """The zoo's `verify_bundle.py -m full` with the weights removed and served from a file:// URL, then the
    README's commands as written (download, ckpt_export on train.json, inference), with monai.bundle alone."""
    python, env = zoo_python
    env = dict(env, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="2", AMVLM_PROGRESS="log")

    def bundle_without_weights(name):
        dst = tmp_path / name
        shutil.copytree(exported["folder"], dst)
        for f in ("model.pt", "model.ts"):
            (dst / "models" / f).unlink()  # as in the zoo's pull request: large_files.yml only
        return dst

    def run(args, cwd):
        proc = subprocess.run([str(python), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{args}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc.stdout

    zoo = bundle_without_weights("zoo")
    assert "ZOO VERIFY OK" in run(["-c", ZOO_VERIFY, str(zoo), str(SCHEMA)], tmp_path)

    user = bundle_without_weights("user")
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    for i in range(2):
        Image.fromarray((torch.rand(40, 48) * 255).byte().numpy()).save(images / f"case{i}.png")
    lines = readme_commands(user / "docs" / "README.md")
    for key in ("download_large_files", "ckpt_export", "run inferring"):
        line = next(c for c in lines if key in c).replace("/path/to/images", str(images))
        run(shlex.split(line)[1:], user)
        if key == "download_large_files":  # fetched, with the hashes large_files.yml gives
            for f in ("model.pt", "model.ts"):
                assert (user / "models" / f).read_bytes() == (exported["server"] / f).read_bytes()
    scripted = torch.jit.load(str(user / "models" / "model.ts"))  # what ckpt_export wrote from train.json
    x = torch.randn(1, 1, 32, 32)
    assert torch.allclose(scripted(x), exported["net"](x), atol=1e-5)
    masks = sorted((user / "predictions").glob("*.png"))
    assert [m.name for m in masks] == ["case0_mask.png", "case1_mask.png"] and Image.open(masks[0]).size == (48, 40)
