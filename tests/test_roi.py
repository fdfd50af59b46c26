"""ROIs: files (mask images, JSON polygons, napari Shapes CSV with shape types), napari-style shapes, masks."""

import numpy as np
import pytest

from napari_binn.roi import closed_shapes, read_roi, roi_to_mask, shapes_to_roi


def test_roi_files(tmp_path):
    import tifffile

    csv_path = tmp_path / "shapes.csv"
    csv_path.write_text("index,shape-type,vertex-index,axis-0,axis-1\n"
                        "0,polygon,0,1,2\n0,polygon,1,1,20\n0,polygon,2,30,20\n"
                        "1,rectangle,0,40,40\n1,rectangle,1,40,50\n1,rectangle,2,50,50\n1,rectangle,3,50,40\n")
    polys = read_roi(csv_path)
    assert len(polys) == 2 and polys[0].shape == (3, 2) and polys[1][2].tolist() == [50.0, 50.0]
    plain = tmp_path / "vertices.csv"
    plain.write_text("row,col\n0,0\n0,10\n10,10\n")
    assert read_roi(plain)[0].shape == (3, 2)
    mask = np.zeros((20, 20), np.uint8)
    mask[5:10, 5:10] = 255
    tifffile.imwrite(tmp_path / "m.tif", mask)
    assert read_roi(tmp_path / "m.tif").sum() == 25
    with pytest.raises(ValueError, match="does not exist"):
        read_roi(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="mask image"):
        read_roi(csv_path.with_suffix(".xyz").write_text("") or csv_path.with_suffix(".xyz"))


def test_napari_shapes_csv_keeps_shape_types(tmp_path):
    """An ellipse in napari's Shapes export (its 4 bounding-box corners) is an ellipse, not a quadrilateral; a path
    (no area) is refused, naming it."""
    path = tmp_path / "shapes.csv"
    path.write_text("index,shape-type,vertex-index,axis-0,axis-1,axis-2\n"
                    "0,ellipse,0,0,10,10\n0,ellipse,1,0,10,50\n0,ellipse,2,0,30,50\n0,ellipse,3,0,30,10\n")
    (ellipse,) = read_roi(path)
    assert len(ellipse) == 64 and ellipse.mean(0) == pytest.approx([20.0, 30.0])
    mask, _ = roi_to_mask([ellipse], (40, 60))
    assert mask[20, 30] and not mask[11, 11]  # a rectangle would cover its corner
    assert mask.sum() == pytest.approx(np.pi * 10 * 20, rel=0.05)
    path.write_text(path.read_text() + "1,path,0,0,0,0\n1,path,1,0,5,5\n")
    with pytest.raises(ValueError, match="shape 2 is a path"):
        read_roi(path)


def test_shapes_to_roi_maps_vertices_to_pixels():
    data = [np.array([[0, 0], [0, 100], [100, 100], [100, 0]], float),
            np.array([[0, 0], [0, 50], [50, 50], [50, 0]], float), np.array([[0, 0], [10, 10]], float)]
    kinds = ["rectangle", "ellipse", "line"]
    assert closed_shapes(kinds) == [0, 1]
    polys, notes = shapes_to_roi(data, kinds, scale=(0.4, 0.4), offset=(1.0, 2.0))
    assert len(polys) == 2 and polys[0].max(0) == pytest.approx([41.0, 42.0])
    assert polys[1].mean(0) == pytest.approx([11.0, 12.0]) and any("line" in n for n in notes)
    only, _ = shapes_to_roi(data, kinds, only=[1])
    assert len(only) == 1 and only[0].mean(0) == pytest.approx([25.0, 25.0])
    none, notes = shapes_to_roi(data, kinds, only=[2])
    assert none is None and "whole image" in notes[-1]
    with pytest.raises(ValueError, match="unknown shape type"):
        shapes_to_roi(data[:1], ["star"])


def test_two_rois_union_equals_mask_union():
    shape = (200, 200)
    polys = [np.array([[0, 0], [0, 90], [90, 90], [90, 0]], float),
             np.array([[110, 110], [110, 199], [199, 199], [199, 110]], float)]
    union = roi_to_mask(polys[0], shape)[0] | roi_to_mask(polys[1], shape)[0]
    np.testing.assert_array_equal(roi_to_mask(polys, shape)[0], union)
    assert not union[100, 100] and union[50, 50] and union[150, 150]


