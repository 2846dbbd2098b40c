"""Shared fixtures: a tiny AMVLM on the packaged text model, and a tiny converted demo data set."""

import importlib.util
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

TINY = dict(image_size=32, patch_size=8, vit_width=32, vit_depth=1, vit_heads=2, vit_mlp=64, text_layers=1,
            max_words=24, embed_dim=16, head_hidden=32, pdt_heads=2)

REPORTS = [
    "Bilateral pulmonary infection, two infected areas, upper left lung and lower right lung.",
    "No lesion is visible.",
    "Unilateral pulmonary infection, one infected area, medium upper right lung.",
    "Unilateral pulmonary infection, one infected area, small lower left lung.",
]


def load_script(name):
    """The module of ``scripts/<name>.py`` (scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture
def tiny_amvlm():
    """A fresh tiny AMVLM (real MiniLM tokenizer and first layer, tiny ViT) with seeded weights."""
    from amvlm_monai.networks.amvlm import AMVLM

    torch.manual_seed(0)
    return AMVLM(**TINY)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """A converted synthetic QaTa-layout data set (32 px): datalist.json and split files in the returned folder."""
    from data_prep.demo_data import make_demo_dataset
    from data_prep.qata import convert_qata

    root = tmp_path_factory.mktemp("demo")
    make_demo_dataset(root / "raw", n_train=16, n_val=4, n_test=4, size=32, seed=0)
    convert_qata(root / "raw", root / "data", seed=0)
    return root / "data"


def train_qata_bundle(tmp_path, split_file, variants=(), extra_configs=(), **overrides):
    """``monai.bundle run training`` of a copy of the QaTa bundle (32 px, 1 epoch) on ``split_file``, with the
    ``variants`` overlays (names under ``configs/variants``) and then ``extra_configs`` (paths); the model folder is
    ``tmp_path / "m"``."""
    import shutil

    from monai.bundle import run

    qata = Path(__file__).resolve().parents[1] / "bundles" / "qata_covid19_cxr_segmentation"
    bundle = tmp_path / "bundle"
    shutil.copytree(qata, bundle)
    configs = ([str(bundle / "configs" / "train.json")]
               + [str(bundle / "configs" / "variants" / f"{v}.json") for v in variants] + [str(p) for p in extra_configs])
    cwd = os.getcwd()
    os.chdir(bundle)
    try:
        run(run_id="training", config_file=configs, bundle_root=str(bundle),
            meta_file=str(bundle / "configs" / "metadata.json"), split_file=str(split_file),
            ckpt_dir=str(tmp_path / "m"), image_size=32, num_workers=0, cache_rate=0.0, amp=False, max_epochs=1,
            **overrides)
    finally:
        os.chdir(cwd)
