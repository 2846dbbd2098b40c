"""The model zoo's unit test of ``bundles/bmseg_bone_ct_lesion_segmentation`` (see ``zoo_unit.py``)."""

import pytest
from test_bmseg import make
from zoo_unit import run_bundle

from data_prep.bmseg import convert_bmseg

NAME = "bmseg_bone_ct_lesion_segmentation"


@pytest.mark.slow
def test_workflows_run_on_tiny_synthetic_data(tmp_path):
    data = convert_bmseg(make(tmp_path / "src" / "BM-Seg"), tmp_path / "data", seed=0).parent
    bundle = run_bundle(NAME, data, tmp_path)
    assert (bundle / "models" / "model.pt").is_file() and (bundle / "eval" / "scores_test.csv").is_file()
    assert len(list((bundle / "predictions").glob("*_mask.png"))) == 2
