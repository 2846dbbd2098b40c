"""The model zoo's command-line checks on this repository's bundles as a fresh checkout has them (no trained
model, no ``model_info.json``): ``verify_net_in_out`` on ``configs/inference.json`` from each bundle's folder."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUNDLES = sorted(p for p in (ROOT / "bundles").iterdir() if (p / "configs" / "metadata.json").is_file())

# `python -m monai.bundle verify_net_in_out ...` run from each bundle folder, in one process (one MONAI import)
LOOP = r"""
import os, runpy, sys
for folder in sys.argv[1:]:
    os.chdir(folder)
    sys.argv = ["monai.bundle", "verify_net_in_out", "network_def", "--meta_file", "configs/metadata.json",
                "--config_file", "configs/inference.json"]
    runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
    print("VERIFIED", os.path.basename(folder), flush=True)
"""


def test_verify_net_in_out_passes_in_every_bundle_without_a_trained_model(tmp_path):
    copies = []
    for bundle in BUNDLES:  # what git tracks: no models/, eval/ or predictions/ of a local run
        dst = tmp_path / bundle.name
        shutil.copytree(bundle, dst, ignore=shutil.ignore_patterns("models", "eval", "predictions", "__pycache__"))
        copies.append(str(dst))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", LOOP, *copies], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("VERIFIED")] == \
        [b.name for b in BUNDLES]
    assert len(BUNDLES) == 4
    # the defaults are the bundle's training settings, and the run says that it used them
    assert "models/model_info.json: no model info" in out and "'out_channels': 20" in out


def test_every_bundle_declares_what_monai_bundle_needs_for_the_zoo_checks():
    """``python -m monai.bundle`` needs fire, verify_metadata jsonschema, large_files.yml pyyaml: MONAI itself
    requires none of them, so the zoo's environment (made from the metadata) has them only if they are declared."""
    import json

    from amvlm_monai.workflows.export import BUNDLE_TOOLS

    for bundle in BUNDLES:
        packages = json.loads((bundle / "configs" / "metadata.json").read_text())["required_packages_version"]
        assert set(BUNDLE_TOOLS) <= set(packages), bundle.name


def test_every_bundle_readme_gives_an_export_readme_without_repository_commands():
    """The export lifts these READMEs' sections; text naming a command of this repository (a converter, an
    amvlm_monai module, make) must be inside <!-- repo-only --> blocks, else the export refuses the README."""
    import json
    import re

    from amvlm_monai.workflows.export import export_readme

    for bundle in BUNDLES:
        meta = json.loads((bundle / "configs" / "metadata.json").read_text())
        text = export_readme(bundle / "docs" / "README.md", meta, "", None, 1.0, "/data/x")
        assert "Not described" not in text and "${" not in text, bundle.name
        assert not re.search(r"(?<![\w.])(data_prep|amvlm_monai)\.|repo-only", text), bundle.name
