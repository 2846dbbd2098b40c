"""The alignment-uncertainty report."""

import pytest
import torch
from conftest import REPORTS

from amvlm_monai.evaluation.uncertainty import format_report, main, similarity_report


@pytest.fixture
def ckpt(tiny_amvlm, tmp_path):
    path = tmp_path / "amvlm.pt"
    torch.save({"model": tiny_amvlm.state_dict(), "config": tiny_amvlm.config}, path)
    return path


def _images(demo_data, n):
    return sorted(str(p) for p in (demo_data.parent / "raw" / "Train_Folder" / "img").glob("*.png"))[:n]


def test_similarities_match_the_embeddings(tiny_amvlm, demo_data):
    from amvlm_monai.evaluation.uncertainty import embed_images

    images = _images(demo_data, 3)
    rep = similarity_report(tiny_amvlm, images, REPORTS[:2])
    assert rep["image_text"].shape == (3, 2) and rep["text_text"].shape == (2, 2)
    v = embed_images(tiny_amvlm, images)
    t = tiny_amvlm.text_embeddings(REPORTS[:2])
    expected = torch.nn.functional.cosine_similarity(v[:, None], t[None], dim=-1)
    assert torch.allclose(rep["image_text"], expected, atol=1e-5)
    assert torch.allclose(rep["text_text"].diagonal(), torch.ones(2), atol=1e-5)
    text = format_report(rep)
    assert REPORTS[0] in text and "reports among themselves: mean" in text


def test_cli_both_directions(ckpt, demo_data, capsys):
    images = _images(demo_data, 2)
    assert main(["--checkpoint", str(ckpt), "--image", images[0], "--reports", *REPORTS[:3]]) == 0
    out = capsys.readouterr().out
    assert out.count("\n  [r") == 3 and "images among themselves:  n/a" in out
    assert main(["--checkpoint", str(ckpt), "--images", *images, "--report", REPORTS[0]]) == 0
    assert "reports among themselves: n/a" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(ckpt), "--image", images[0]])


def test_cli_heatmap_writes_the_alignment_view(ckpt, demo_data, tmp_path, capsys):
    from PIL import Image

    images = sorted(str(p) for p in (demo_data.parent / "raw" / "Test_Folder" / "img").glob("*.png"))
    out = tmp_path / "align.png"
    assert main(["--checkpoint", str(ckpt), "--image", images[0], "--reports", *REPORTS[:2],
                 "--heatmap", str(out)]) == 0
    assert f"alignment heat-maps: {out}" in capsys.readouterr().out
    w, h = Image.open(out).size
    assert h > w > 200  # an image row and one row per report
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(ckpt), "--images", *images[:2], "--report", REPORTS[0], "--heatmap", str(out)])
