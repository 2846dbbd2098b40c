import json

import numpy as np
import pytest
from openpyxl import Workbook
from PIL import Image

from amvlm_monai.data.datalist import load_datalist
from amvlm_monai.data.describe_nuclei import describe_nuclei, nuclei_stats
from amvlm_monai.utils.errors import DataError
from data_prep.monuseg import convert_monuseg, fill_polygon, main, rasterize

TRAIN = "MoNuSeg 2018 Training Data"
TEST = "MoNuSegTestData"
H, W = 24, 32  # image size of the replicas (height, width)


def squares(seed, n=3):
    """n non-overlapping axis-aligned squares (x0, y0, side) with integer corners inside an H x W image."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        side = int(rng.integers(3, 6))
        out.append((2 + 10 * k, int(rng.integers(0, H - side)), side))
    return out


def square_polygon(x0, y0, side):
    return [(x0, y0), (x0 + side, y0), (x0 + side, y0 + side), (x0, y0 + side)]


def write_xml(path, polygons):
    """Aperio ImageScope XML: Annotations/Annotation/Regions/Region/Vertices/Vertex, as MoNuSeg ships it."""
    regions = []
    for k, poly in enumerate(polygons, start=1):
        verts = "".join(f'<Vertex X="{x}" Y="{y}" Z="0"/>' for x, y in poly)
        regions.append(f'<Region Id="{k}" Type="0" Zoom="0.5"><Attributes/><Vertices>{verts}</Vertices></Region>')
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        '<?xml version="1.0"?>\n<Annotations MicronsPerPixel="0.252100"><Annotation Id="1" Name="" ReadOnly="0">'
        '<Attributes><Attribute Name="Description" Id="0" Value=""/></Attributes><Regions>'
        '<RegionAttributeHeaders><AttributeHeader Id="9999" Name="Region" ColumnWidth="-1"/></RegionAttributeHeaders>'
        + "".join(regions) + "</Regions><Plots/></Annotation></Annotations>\n"
    )


def write_tif(path, seed):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(path)


def make_original(root, n_train=5, n_test=2):
    for i in range(n_train):
        name = f"TCGA-{i:02d}-0000"
        write_tif(root / TRAIN / "Tissue Images" / f"{name}.tif", i)
        write_xml(root / TRAIN / "Annotations" / f"{name}.xml", [square_polygon(*s) for s in squares(i)])
    for i in range(n_test):
        name = f"TCGA-T{i}-0000"
        write_tif(root / TEST / f"{name}.tif", 100 + i)
        write_xml(root / TEST / f"{name}.xml", [square_polygon(*s) for s in squares(100 + i)])
    return root


def sheet(path, header, rows):
    wb = Workbook()
    ws = wb.active
    ws.append(header)
    for r in rows:
        ws.append(r)
    wb.save(path)


LVIT = {"Train": ["a1", "a2", "a3"], "Val": ["b1"], "Test": ["c1", "c2"]}


def make_lvit(root, beside=False):
    for split, names in LVIT.items():
        for i, name in enumerate(names):
            write_tif(root / f"{split}_Folder" / "img" / f"{name}.png", i)
            mask = np.zeros((H, W), np.uint8)
            mask[2:6, 3 + i : 8 + i] = 255
            (root / f"{split}_Folder" / "labelcol").mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(root / f"{split}_Folder" / "labelcol" / f"{name}.png")
        cell = "{}.png" if split != "Test" else "{}"  # the test sheet names images by stem (tolerated)
        where = root if beside else root / f"{split}_Folder"  # LViT's release: inside the split folder
        sheet(where / f"{split}_text.xlsx", ["Image", "Description"],
              [(cell.format(n), f"Nuclei of {n}.") for n in names])
    return root


def listing(root):
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {p.relative_to(root).as_posix(): (p.stat().st_mtime_ns, p.read_bytes()) for p in files}


def test_square_polygon_gives_exactly_its_pixels():
    rr, cc = fill_polygon(np.array(square_polygon(2, 2, 4), float), (10, 10))
    assert sorted(zip(rr.tolist(), cc.tolist())) == [(r, c) for r in range(2, 6) for c in range(2, 6)]
    # pixel centres (c + 0.5, r + 0.5) inside [2.4, 5.5) x [2.6, 6.5): columns 2-4, rows 3-5
    m = rasterize([np.array([(2.4, 2.6), (5.5, 2.6), (5.5, 6.5), (2.4, 6.5)])], (10, 10))
    expected = np.zeros((10, 10), np.uint16)
    expected[3:6, 2:5] = 1
    np.testing.assert_array_equal(m, expected)
    # a triangle covers about its area; parts outside the image are dropped
    tri = rasterize([np.array([(0.0, 0.0), (8.0, 0.0), (0.0, 8.0)])], (10, 10))
    # centres on the hypotenuse (r + c = 7) are outside: half-open spans, as for the square's right/lower edges
    assert tri.sum() == 28 and tri[0, 6] == 1 and tri[0, 7] == 0 and tri[6, 0] == 1 and tri[7, 0] == 0
    assert rasterize([np.array([(-4.0, -4.0), (3.0, -4.0), (3.0, 3.0), (-4.0, 3.0)])], (5, 5)).sum() == 9


def test_touching_and_overlapping_polygons_stay_separate_instances():
    a, b = np.array(square_polygon(2, 2, 4), float), np.array(square_polygon(6, 2, 4), float)  # share x = 6
    inst = rasterize([a, b], (8, 12))
    assert (inst[2:6, 2:6] == 1).all() and (inst[2:6, 6:10] == 2).all() and (inst > 0).sum() == 32
    assert nuclei_stats(inst, instances=True).count == 2 and nuclei_stats(inst > 0).count == 1
    c = np.array(square_polygon(4, 2, 4), float)  # overlaps a: the later region wins
    inst = rasterize([a, c], (8, 12))
    assert (inst[2:6, 2:4] == 1).all() and (inst[2:6, 4:8] == 2).all()


def test_describe_nuclei():
    inst = np.zeros((8, 8), np.uint16)
    assert describe_nuclei(inst) == "No nuclei are visible."
    inst[0:2, 0:2] = 1
    assert describe_nuclei(inst, True) == (
        "There is one nucleus. The nuclei density is high in the upper left and low in the upper right, lower left "
        "and lower right.")
    inst[0:4, 4:8] = 2
    inst[4:5, 0:4] = 3
    inst[6:8, 4:6] = 4
    # coverage: UL 4/16, UR 16/16 (high), LL 4/16 = 0.25 (high), LR 4/16 = 0.25; thresholds move the words
    assert describe_nuclei(inst, True) == "There are four nuclei. The nuclei density is high in all four quadrants."
    assert describe_nuclei(inst, True, thresholds=(0.1, 0.5)) == (
        "There are four nuclei. The nuclei density is medium in the upper left, lower left and lower right and high "
        "in the upper right.")
    many = np.zeros((40, 40), np.uint16)
    many[::3, ::3] = np.arange(1, 14 * 14 + 1).reshape(14, 14)
    assert describe_nuclei(many, True).startswith("There are 196 nuclei.")


def test_original_layout(tmp_path):
    src = make_original(tmp_path / "src")
    before = listing(src)
    path = main(["--src", str(src), "--out", str(tmp_path / "out"), "--seed", "0"])
    assert listing(src) == before
    raw = json.loads(path.read_text())
    assert {k: len(raw[k]) for k in ('training', 'validation', 'test')} == {"training": 4, "validation": 1, "test": 2}
    assert {it["id"] for it in raw["test"]} == {"TCGA-T0-0000", "TCGA-T1-0000"}
    first = raw["training"][0]
    assert set(first) == {"image", "label", "text", "id"}
    assert first["image"] == f"images/{first['id']}.png" and first["label"] == f"labels/{first['id']}.png"
    for section in ("training", "validation", "test"):
        for it in load_datalist(path, section):
            seed = int(it["id"][5:7]) if section != "test" else 100 + int(it["id"][6])
            expected = np.zeros((H, W), np.uint16)
            for k, (x0, y0, side) in enumerate(squares(seed), start=1):
                expected[y0 : y0 + side, x0 : x0 + side] = k
            label = np.asarray(Image.open(it["label"]))
            np.testing.assert_array_equal(label, np.where(expected > 0, 255, 0))
            inst = np.asarray(Image.open(it["label"].replace("/labels/", "/instances/")))
            assert inst.dtype == np.uint16
            np.testing.assert_array_equal(inst, expected)
            rgb = Image.open(it["image"])
            assert rgb.mode == "RGB"
            tif = src / (f"{TRAIN}/Tissue Images" if section != "test" else TEST) / f"{it['id']}.tif"
            np.testing.assert_array_equal(np.asarray(rgb), np.asarray(Image.open(tif)))
            assert it["text"] == describe_nuclei(expected, True) and it["text"].startswith("There are three nuclei.")
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["datalist.json", "images", "instances", "labels", "split_fewshot1.json", "split_fewshot10.json",
                     "split_labeled25.json", "split_labeled50.json"]


def test_validation_is_seeded_lvit_24_6(tmp_path):
    src = make_original(tmp_path / "src", n_train=30, n_test=1)
    p0 = convert_monuseg(src, tmp_path / "o0", seed=0)
    dl = json.loads(p0.read_text())
    assert (len(dl["training"]), len(dl["validation"])) == (24, 6)
    assert {it["id"] for it in dl["training"]}.isdisjoint(it["id"] for it in dl["validation"])
    again = convert_monuseg(src, tmp_path / "o0b", seed=0)
    for name in ("datalist.json", "split_labeled25.json", "split_fewshot10.json"):
        assert (again.parent / name).read_bytes() == (p0.parent / name).read_bytes()
    other = json.loads(convert_monuseg(src, tmp_path / "o1", seed=1).read_text())
    assert {it["id"] for it in other["validation"]} != {it["id"] for it in dl["validation"]}
    split = json.loads((p0.parent / "split_labeled25.json").read_text())
    assert [it["labeled"] for it in split["training"]].count(True) == 6


def test_lvit_layout(tmp_path):
    src = make_lvit(tmp_path / "data" / "MoNuSeg")
    before = listing(src)
    path = convert_monuseg(tmp_path / "data", tmp_path / "out")  # finds the sub-folder
    assert listing(src) == before
    dl = json.loads(path.read_text())
    assert {k: len(dl[k]) for k in ('training', 'validation', 'test')} == {"training": 3, "validation": 1, "test": 2}
    assert dl["training"][0] == {"image": "../data/MoNuSeg/Train_Folder/img/a1.png",
                                 "label": "../data/MoNuSeg/Train_Folder/labelcol/a1.png", "text": "Nuclei of a1.",
                                 "id": "a1"}
    assert [it["text"] for it in load_datalist(path, "test")] == ["Nuclei of c1.", "Nuclei of c2."]
    assert not (tmp_path / "out" / "images").exists()


def test_lvit_sheets_inside_or_beside_and_the_datasets_folder(tmp_path):
    """LViT's README tree (datasets/{Covid19,MoNuSeg}, each split's sheet in its folder) and the older top-level
    sheets give the same datalist; --src datasets takes the MoNuSeg sub-folder."""
    from test_qata import make_lvit as make_qata_lvit

    make_qata_lvit(tmp_path / "datasets" / "Covid19")
    make_lvit(tmp_path / "datasets" / "MoNuSeg")
    assert (tmp_path / "datasets" / "MoNuSeg" / "Test_Folder" / "Test_text.xlsx").is_file()
    inside = convert_monuseg(tmp_path / "datasets", tmp_path / "out_a")
    beside = convert_monuseg(make_lvit(tmp_path / "b" / "MoNuSeg", beside=True), tmp_path / "out_b")
    for key in ("training", "validation", "test"):
        a, b = load_datalist(inside, key), load_datalist(beside, key)
        assert all("/MoNuSeg/" in x["image"] for x in a)
        assert [(x["id"], x["text"]) for x in a] == [(x["id"], x["text"]) for x in b] and a


def break_xml_without_regions(src):
    write_xml(src / TRAIN / "Annotations" / "TCGA-01-0000.xml", [])
    return ["TCGA-01-0000.xml", "no <Region>"]


def break_xml_without_tif(src):
    write_xml(src / TRAIN / "Annotations" / "TCGA-99-0000.xml", [square_polygon(1, 1, 3)])
    return ["annotation without an image", "TCGA-99-0000.xml"]


def break_tif_without_xml(src):
    (src / TEST / "TCGA-T1-0000.xml").unlink()
    return ["image without an annotation", "TCGA-T1-0000.tif"]


def break_corrupt_tif(src):
    p = src / TRAIN / "Tissue Images" / "TCGA-02-0000.tif"
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    return ["corrupt TIF", "TCGA-02-0000.tif"]


def break_vertex_outside(src):
    write_xml(src / TRAIN / "Annotations" / "TCGA-03-0000.xml",
              [square_polygon(1, 1, 3), [(4, 4), (W + 5, 4), (W + 5, 8)]])
    return ["TCGA-03-0000.xml", "outside the 32x24 image", "(37, 4)"]


def break_bad_vertex(src):
    write_xml(src / TEST / "TCGA-T0-0000.xml", [[(1, 1), (5, 1)], [(1, 1), (4, "x"), (4, 4)]])
    return ["TCGA-T0-0000.xml", "2 finite vertices", "numeric X and Y"]


def break_corrupt_xml(src):
    (src / TRAIN / "Annotations" / "TCGA-04-0000.xml").write_text("<Annotations><Annotation>")
    return ["corrupt XML", "TCGA-04-0000.xml"]


def break_no_test_folder(src):
    for p in (src / TEST).iterdir():
        p.unlink()
    (src / TEST).rmdir()
    return ["one test folder", "none"]


@pytest.mark.parametrize(
    "breaker",
    [break_xml_without_regions, break_xml_without_tif, break_tif_without_xml, break_corrupt_tif,
     break_vertex_outside, break_bad_vertex, break_corrupt_xml, break_no_test_folder],
)
def test_original_errors_name_the_file_and_write_nothing(tmp_path, breaker):
    src = make_original(tmp_path / "src")
    expected = breaker(src)
    before = listing(src)
    with pytest.raises(DataError) as e:
        convert_monuseg(src, tmp_path / "out")
    for text in expected:
        assert text in str(e.value)
    assert not (tmp_path / "out").exists()
    assert listing(src) == before


def test_vertices_near_the_border_are_clipped(tmp_path):
    src = make_original(tmp_path / "src", n_train=2, n_test=1)
    write_xml(src / TEST / "TCGA-T0-0000.xml", [[(W - 3, -1.5), (W + 1.5, -1.5), (W + 1.5, 2), (W - 3, 2)]])
    path = convert_monuseg(src, tmp_path / "out")
    (it,) = load_datalist(path, "test")
    expected = np.zeros((H, W), np.uint8)
    expected[0:2, W - 3 :] = 255
    np.testing.assert_array_equal(np.asarray(Image.open(it["label"])), expected)
    with pytest.raises(DataError, match="outside"):
        convert_monuseg(src, tmp_path / "strict", margin=0)


def test_all_problems_at_once_and_lvit_errors(tmp_path):
    src = make_original(tmp_path / "src")
    expected = break_xml_without_regions(src) + break_corrupt_tif(src) + break_tif_without_xml(src)
    with pytest.raises(DataError) as e:
        convert_monuseg(src, tmp_path / "out")
    assert len(e.value.problems) == 3 and all(t in str(e.value) for t in expected)

    lvit = make_lvit(tmp_path / "lvit")
    sheet(lvit / "Val_Folder" / "Val_text.xlsx", ["Image", "Description"], [("b1.png", " ")])
    (lvit / "Test_Folder" / "labelcol" / "c2.png").unlink()
    with pytest.raises(DataError) as e:
        convert_monuseg(lvit, tmp_path / "out")
    msg = str(e.value)
    assert "Val_text.xlsx row 2: no Description for b1.png" in msg
    assert "missing mask" in msg and "c2.png" in msg
    assert not (tmp_path / "out").exists()


def test_output_inside_source_and_bad_source(tmp_path):
    src = make_original(tmp_path / "src", n_train=2, n_test=1)
    before = listing(src)
    for out in (src / "out", src / TEST / "x"):
        with pytest.raises(DataError, match="inside the source"):
            convert_monuseg(src, out)
    assert listing(src) == before
    nested = make_original(tmp_path / "wrap" / "images" / "m", n_train=2, n_test=1)
    with pytest.raises(DataError, match="which the converter writes to"):  # out/images would hold the source
        convert_monuseg(nested, tmp_path / "wrap")
    with pytest.raises(DataError, match="no MoNuSeg layout"):
        convert_monuseg(src / TRAIN / "Annotations", tmp_path / "o")
    with pytest.raises(DataError, match="does not exist"):
        convert_monuseg(tmp_path / "nowhere", tmp_path / "o")
