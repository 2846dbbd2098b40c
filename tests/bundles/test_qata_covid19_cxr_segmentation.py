"""The model zoo's unit test of ``bundles/qata_covid19_cxr_segmentation`` (see ``zoo_unit.py``)."""

import pytest
from zoo_unit import run_bundle

NAME = "qata_covid19_cxr_segmentation"


@pytest.mark.slow
def test_workflows_run_on_tiny_synthetic_data(demo_data, tmp_path):
    bundle = run_bundle(NAME, demo_data, tmp_path)
    assert (bundle / "models" / "amvlm_pretrained.pt").is_file() and (bundle / "models" / "model.pt").is_file()
    assert (bundle / "eval" / "scores_test.csv").is_file()
    assert len(list((bundle / "predictions").glob("*_mask.png"))) == 2
