"""The model zoo's unit test of ``bundles/monuseg_he_nuclei_segmentation`` (see ``zoo_unit.py``): RGB input."""

import pytest
from test_monuseg import make_original
from zoo_unit import run_bundle

from data_prep.monuseg import convert_monuseg

NAME = "monuseg_he_nuclei_segmentation"


@pytest.mark.slow
def test_workflows_run_on_tiny_synthetic_data(tmp_path):
    data = convert_monuseg(make_original(tmp_path / "src", n_train=8, n_test=3), tmp_path / "data", seed=0).parent
    bundle = run_bundle(NAME, data, tmp_path)
    assert (bundle / "models" / "model.pt").is_file() and (bundle / "eval" / "scores_test.csv").is_file()
    assert len(list((bundle / "predictions").glob("*_mask.png"))) == 2
