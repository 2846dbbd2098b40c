import numpy as np
import pytest

from amvlm_monai.utils.shapes import spatial_size


def test_spatial_size_repeats_and_checks():
    assert spatial_size(64) == (64, 64)
    assert spatial_size([64, 48]) == (64, 48)
    assert spatial_size(np.int64(8), dims=3) == (8, 8, 8)
    for bad in (0, -1, [64], [64, 48, 32], 6.5, "64", True, [64, 0]):
        with pytest.raises(ValueError, match="patch_size must be a positive int or 2 positive ints"):
            spatial_size(bad, "patch_size")
