"""The README's own-data walk-through, run line by line as written (in-process, through each module's own command
line), on a small generated folder; only small-size flags are added to the bundle runs."""

import os
import re
import runpy
import shlex
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = "bundles/qata_covid19_cxr_segmentation"
LIGHT = "light"
SMALL = {"image_size": 32, "batch_size": 4, "num_workers": 0, "amp": False, "max_epochs": 1, "cache_rate": 0.0}
SMALL_NET = {"unet_size": LIGHT}
PRETRAIN_SMALL = {**SMALL, "network_def#patch_size": 8, "network_def#vit_width": 32, "network_def#vit_depth": 1,
                  "network_def#vit_heads": 2, "network_def#vit_mlp": 64, "network_def#text_layers": 1,
                  "network_def#embed_dim": 16, "network_def#head_hidden": 32, "network_def#pdt_heads": 2}
#: flags the test adds per bundle run (sizes and speed only; never a setting the commands should have had)
ADDED = {"pretraining": PRETRAIN_SMALL, "training": {**SMALL, **SMALL_NET}, "evaluating": {"num_workers": 0},
         "inferring": {"num_workers": 0}}


def walkthrough_lines() -> list[str]:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- walkthrough:[^>]*-->\s*```bash\n(.*?)```", text, re.S)
    assert m, "README.md has no walk-through block"
    return [line for line in m.group(1).splitlines() if line.strip() and not line.lstrip().startswith("#")]


def make_folder(root: Path, n: int = 12, size: int = 32) -> None:
    rng = np.random.default_rng(0)
    for i in range(1, n + 1):
        img = rng.normal(100, 20, (size, size)).clip(0, 255)
        mask = np.zeros((size, size), np.uint8)
        r, c = rng.integers(2, size - 12, 2)
        mask[r: r + 10, c: c + 10] = 255
        img[mask > 0] += 80
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / "images" / f"case_{i:03d}.png")
        Image.fromarray(mask).save(root / "masks" / f"case_{i:03d}.png")


def run_module(argv: list[str]) -> None:
    """``python -m MODULE ARGS`` in this process, through the module's ``__main__`` (its own argument parsing)."""
    module, args = argv[2], argv[3:]
    if module == "monai.bundle" and args[:1] == ["run"]:
        for key, value in ADDED.get(args[1], {}).items():
            args += [f"--{key}", repr(value) if not isinstance(value, str) else value]
    saved = sys.argv
    try:
        sys.argv = [module] + args
        with warnings.catch_warnings():  # runpy notes that the package was imported before: expected here
            warnings.filterwarnings("ignore", "'.*' found in sys.modules", RuntimeWarning)
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        assert e.code in (0, None), f"{' '.join(argv)} exited with {e.code}"
    finally:
        sys.argv = saved


def test_readme_walkthrough_from_a_folder_to_scores_and_predictions(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / BUNDLE, repo / BUNDLE, ignore=shutil.ignore_patterns("models", "eval", "predictions"))
    make_folder(repo / "my_folder")
    lines = walkthrough_lines()
    assert any("data_prep.own_data" in line for line in lines) and any("inferring" in line for line in lines)
    monkeypatch.chdir(repo)
    for line in lines:
        argv = shlex.split(line)
        if argv[0] == "cd":
            os.chdir(argv[1])
        elif argv[0] == "cat":
            rows = Path(argv[1]).read_text().splitlines()
            assert rows, argv[1]
            print("\n".join(rows))
        else:
            assert argv[:2] == ["python", "-m"], line
            run_module(argv)
    bundle = repo / BUNDLE
    metrics = (bundle / "eval" / "metrics.csv").read_text()
    assert "val_mean_dice" in metrics and "val_mean_iou" in metrics
    assert (bundle / "eval" / "scores_test.csv").is_file()
    assert (bundle / "models" / "model_info.json").is_file()
    preds = sorted((repo / "my_predictions").glob("*_mask.png"))
    assert len(preds) == 12 and Image.open(preds[0]).size == (32, 32)
    assert (repo / "my_predictions" / "case_001_seg.nii.gz").is_file()
    assert not (repo / "my_folder" / "images" / "datalist.json").exists()
    assert sorted(p.name for p in (repo / "my_folder").rglob("*") if p.is_file()) == sorted(
        [f"case_{i:03d}.png" for i in range(1, 13)] * 2)
