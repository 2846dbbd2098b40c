"""The model zoo's unit test of ``bundles/mrspineseg_spine_mr_segmentation`` (see ``zoo_unit.py``): 20 classes,
NIfTI slices in and out."""

import json

import nibabel as nib
import numpy as np
import pytest
from test_mrspineseg import make
from zoo_unit import run_bundle

from data_prep.mrspineseg import convert_mrspineseg

NAME = "mrspineseg_spine_mr_segmentation"


@pytest.mark.slow
def test_workflows_run_on_tiny_synthetic_data(tmp_path):
    data = convert_mrspineseg(make(tmp_path / "src", n_cases=6), tmp_path / "data", seed=0).parent
    bundle = run_bundle(NAME, data, tmp_path)
    assert json.loads((bundle / "models" / "model_info.json").read_text())["out_channels"] == 20
    assert (bundle / "eval" / "scores_test.csv").is_file()
    masks = sorted((bundle / "predictions").glob("*_mask.nii.gz"))
    assert len(masks) == 2 and np.asarray(nib.load(masks[0]).dataobj).max() < 20
