"""Tests for napari_binn.io: read_stack, write_stack_tiff and the shipped sample (the napari reader:
_napari/test_reader.py)."""

from __future__ import annotations

import gc
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_binn import io as nio
from napari_binn.io import Stack, StackWarning, load_scratch_phase_contrast, read_stack, write_stack_tiff


def _stack(T=4, Y=12, X=10, dtype=np.uint16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(10, 1000, size=(T, Y, X)).astype(dtype)


def _quiet_read(*args, **kwargs) -> Stack:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StackWarning)
        return read_stack(*args, **kwargs)


def _has(warnings_list, text):
    return any(text.lower() in w.lower() for w in warnings_list)


# ---------------------------------------------------------------- write_stack_tiff round trip and calibration


def test_write_read_round_trip_regular(tmp_path):
    data = _stack()
    path = write_stack_tiff(tmp_path / "a.tif", data, 0.65, [0.0, 0.5, 1.0, 1.5])
    s = read_stack(path)
    np.testing.assert_array_equal(np.asarray(s.data), data)
    assert s.pixel_size_um == pytest.approx(0.65)
    np.testing.assert_allclose(s.times_h, [0.0, 0.5, 1.0, 1.5])
    assert s.frame_interval_h == pytest.approx(0.5)
    assert s.name == "a"
    assert s.metadata["pixel_size_source"].startswith("from ImageJ")
    assert s.metadata["time_units"] == "h"
    assert s.metadata["warnings"] == []
    with tifffile.TiffFile(path) as tif:  # ImageJ itself sees the calibration
        assert tif.is_imagej
        assert tif.imagej_metadata["finterval"] == pytest.approx(1800.0)
        assert tif.imagej_metadata["unit"] == "um"


def test_write_read_round_trip_irregular_float64_compressed(tmp_path):
    data = np.random.default_rng(1).random((3, 8, 9))
    times = [0.0, 0.25, 2.0]
    path = write_stack_tiff(tmp_path / "b.tif", data, 2.0, times, compression="zlib")
    s = read_stack(path)
    assert s.data.dtype == np.float32  # ImageJ has no float64
    np.testing.assert_allclose(np.asarray(s.data), data.astype(np.float32))
    np.testing.assert_array_equal(s.times_h, times)
    assert s.frame_interval_h is None


def test_write_lazy_input_and_no_calibration(tmp_path):
    src = write_stack_tiff(tmp_path / "src.tif", _stack(T=5), None, None)
    lazy = _quiet_read(src, lazy=True)
    out = write_stack_tiff(tmp_path / "copy.tif", lazy.data, 1.5, np.arange(5) * 2.0)
    s = read_stack(out)
    np.testing.assert_array_equal(np.asarray(s.data), np.asarray(lazy.data))
    assert s.pixel_size_um == pytest.approx(1.5)
    np.testing.assert_allclose(s.times_h, np.arange(5) * 2.0)


def test_write_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match=r"\(T, Y, X\)"):
        write_stack_tiff(tmp_path / "x.tif", np.zeros((4, 4)), 1.0, None)
    with pytest.raises(ValueError, match="strictly increasing"):
        write_stack_tiff(tmp_path / "x.tif", np.zeros((3, 4, 4)), 1.0, [0, 2, 1])


def test_imagej_calibration_units(tmp_path):
    path = tmp_path / "ij.tif"
    tifffile.imwrite(
        path,
        _stack(),
        imagej=True,
        resolution=(2.0, 2.0),  # pixels per unit
        metadata={"axes": "TYX", "unit": "micron", "finterval": 5.0, "tunit": "min", "spacing": 3.0},
    )
    s = read_stack(path)
    assert s.pixel_size_um == pytest.approx(0.5)
    assert s.frame_interval_h == pytest.approx(5 / 60)
    assert "finterval" in s.metadata["times_source"]
    assert s.metadata["file_calibration"]["spacing"] == 3.0


def test_ome_calibration_time_increment(tmp_path):
    path = tmp_path / "a.ome.tif"
    meta = {"axes": "TYX", "PhysicalSizeX": 650, "PhysicalSizeXUnit": "nm"}
    meta.update(TimeIncrement=5, TimeIncrementUnit="min")
    tifffile.imwrite(path, _stack(), ome=True, metadata=meta)
    s = read_stack(path)
    assert s.name == "a"
    assert s.pixel_size_um == pytest.approx(0.65)
    assert s.metadata["pixel_size_source"] == "from OME metadata (PhysicalSizeX=650 nm)"
    np.testing.assert_allclose(s.times_h, np.arange(4) * 5 / 60)


def test_ome_plane_delta_t_irregular(tmp_path):
    path = tmp_path / "b.ome.tif"
    meta = {
        "axes": "TYX",
        "PhysicalSizeX": 1.3,
        "TimeIncrement": 5,
        "Plane": {"DeltaT": [0, 300, 600, 1800], "DeltaTUnit": ["s"] * 4},
    }
    tifffile.imwrite(path, _stack(), ome=True, metadata=meta)
    s = read_stack(path)
    assert s.pixel_size_um == pytest.approx(1.3)
    np.testing.assert_allclose(s.times_h, [0, 300 / 3600, 600 / 3600, 0.5])
    assert "DeltaT" in s.metadata["times_source"]


def test_plain_tiff_resolution_in_centimetres(tmp_path):
    path = tmp_path / "cm.tif"
    cm = {"resolution": (1e4 / 0.8, 1e4 / 0.8), "resolutionunit": "CENTIMETER"}  # pixels per cm
    tifffile.imwrite(path, _stack(), photometric="minisblack", **cm)
    assert _quiet_read(path).pixel_size_um == pytest.approx(0.8)
    inch = tmp_path / "inch.tif"
    tifffile.imwrite(inch, _stack(), photometric="minisblack", resolution=(72, 72), resolutionunit="INCH")
    assert _quiet_read(inch).pixel_size_um is None  # dpi is not a microscope calibration


def test_missing_calibration_warns_loudly(tmp_path):
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, _stack(T=5), photometric="minisblack")
    with pytest.warns(StackWarning, match="PIXEL SIZE UNKNOWN"):
        s = read_stack(path)
    assert s.pixel_size_um is None
    assert s.metadata["pixel_size_source"] == "unknown"
    np.testing.assert_array_equal(s.times_h, np.arange(5))
    assert s.metadata["time_units"] == "frames"
    assert _has(s.metadata["warnings"], "FRAME INTERVAL UNKNOWN")
    assert "frames" in repr(s)


def test_user_arguments_override_metadata(tmp_path):
    path = write_stack_tiff(tmp_path / "a.tif", _stack(), 0.65, [0, 1, 2, 3])
    s = read_stack(path, pixel_size_um=0.3, frame_interval_h=0.25)
    assert s.pixel_size_um == 0.3 and s.metadata["pixel_size_source"] == "user"
    np.testing.assert_allclose(s.times_h, [0, 0.25, 0.5, 0.75])
    assert s.metadata["times_source"] == "user (frame_interval_h)"
    assert _has(s.metadata["notes"], "overridden")
    s = read_stack(path, times_h=[0, 1, 5, 6.5])
    np.testing.assert_array_equal(s.times_h, [0, 1, 5, 6.5])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"times_h": [0, 1, 2]}, "3 values for 4 frames"),
        ({"times_h": [0, 2, 1, 3]}, "strictly increasing"),
        ({"times_h": [0, 1, 2, 3], "frame_interval_h": 1.0}, "not both"),
        ({"pixel_size_um": -1.0}, "positive"),
        ({"frame_interval_h": 0.0}, "positive"),
        ({"channel": "green"}, "integer index or 'luminance'"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    path = write_stack_tiff(tmp_path / "a.tif", _stack(), 1.0, [0, 1, 2, 3])
    with pytest.raises(ValueError, match=match):
        read_stack(path, **kwargs)


# ---------------------------------------------------------------- folders, globs, natural order


def _write_png_frames(folder: Path, names, shape=(6, 7)):
    folder.mkdir(exist_ok=True)
    for value, name in names:
        Image.fromarray(np.full(shape, value, np.uint8)).save(folder / name)


def test_folder_natural_sort_and_glob(tmp_path):
    names = [(10, "t1.png"), (20, "t2.png"), (100, "t10.png"), (30, "t3.png")]
    _write_png_frames(tmp_path / "frames", names)
    (tmp_path / "frames" / "notes.txt").write_text("not an image")
    s = _quiet_read(tmp_path / "frames", frame_interval_h=1.0)
    assert s.shape == (4, 6, 7)
    assert [int(np.asarray(s.data[t])[0, 0]) for t in range(4)] == [10, 20, 30, 100]  # t2 before t10
    assert s.name == "frames"
    assert [Path(f).name for f in s.metadata["files"]] == ["t1.png", "t2.png", "t3.png", "t10.png"]
    g = _quiet_read(str(tmp_path / "frames" / "t*.png"), frame_interval_h=1.0)
    np.testing.assert_array_equal(np.asarray(g.data), np.asarray(s.data))
    files = [tmp_path / "frames" / n for _, n in names]
    lst = _quiet_read(files, frame_interval_h=1.0)
    np.testing.assert_array_equal(np.asarray(lst.data), np.asarray(s.data))


def test_natural_key_orders_numbers():
    names = ["f10.tif", "f2.tif", "f1.tif", "F3.tif"]
    assert sorted(names, key=lambda n: nio._natural_key(Path(n))) == ["f1.tif", "f2.tif", "F3.tif", "f10.tif"]


def test_folder_of_tiff_frames_keeps_pixel_size(tmp_path):
    folder = tmp_path / "tifs"
    folder.mkdir()
    for t in range(3):
        write_stack_tiff(folder / f"frame_{t}.tif", np.full((1, 5, 5), t + 1, np.uint16), 0.4, None)
    # single-frame ImageJ files: one page each
    s = _quiet_read(folder, frame_interval_h=0.5)
    assert s.pixel_size_um == pytest.approx(0.4)
    assert [int(np.asarray(s.data[t]).max()) for t in range(3)] == [1, 2, 3]


def test_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="contains no image frames"):
        read_stack(tmp_path / "empty")
    with pytest.raises(ValueError, match="no image files .* match"):
        read_stack(str(tmp_path / "empty" / "*.png"))
    with pytest.raises(ValueError, match="no such file or folder"):
        read_stack(tmp_path / "missing.tif")
    _write_png_frames(tmp_path / "mixed", [(1, "a1.png"), (2, "a2.png")])
    Image.fromarray(np.zeros((9, 9), np.uint8)).save(tmp_path / "mixed" / "a3.png")
    with pytest.raises(ValueError, match="a3.png: frame size 9x9 differs"):
        read_stack(tmp_path / "mixed")


# ---------------------------------------------------------------- RGB and multi-dimensional stacks


def _write_rgb_jpegs(folder: Path, T=3, grey=False):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for t in range(T):
        rgb = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
        if grey:
            rgb[..., 1] = rgb[..., 2] = rgb[..., 0]
        Image.fromarray(rgb, "RGB").save(folder / f"img{t}.png")  # PNG: lossless, exact values


def test_rgb_default_luminance_warns(tmp_path):
    _write_rgb_jpegs(tmp_path / "rgb")
    with pytest.warns(StackWarning, match="luminance"):
        s = read_stack(tmp_path / "rgb", frame_interval_h=1.0, pixel_size_um=1.0)
    assert s.metadata["channel"].startswith("luminance")
    rgb0 = np.asarray(Image.open(tmp_path / "rgb" / "img0.png")).astype(np.float32)
    expected = rgb0 @ np.array([0.2126, 0.7152, 0.0722], np.float32)
    np.testing.assert_allclose(np.asarray(s.data[0]), expected, rtol=1e-5)
    explicit = read_stack(tmp_path / "rgb", frame_interval_h=1.0, pixel_size_um=1.0, channel="luminance")
    assert not _has(explicit.metadata["warnings"], "luminance")
    green = read_stack(tmp_path / "rgb", frame_interval_h=1.0, pixel_size_um=1.0, channel=1)
    np.testing.assert_array_equal(np.asarray(green.data[0]), rgb0[..., 1])
    assert green.metadata["channel"] == "RGB component 1 of 3"


def test_greyscale_stored_as_rgb_uses_channel_0_without_warning(tmp_path):
    _write_rgb_jpegs(tmp_path / "g", grey=True)
    s = read_stack(tmp_path / "g", frame_interval_h=1.0, pixel_size_um=1.0)
    assert s.metadata["warnings"] == []
    assert s.data.dtype == np.uint8
    assert "R = G = B" in s.metadata["channel"]


def test_rgb_tiff_stack_channel(tmp_path):
    data = np.random.default_rng(2).integers(0, 255, (4, 6, 5, 3), dtype=np.uint8)
    path = tmp_path / "rgb.tif"
    tifffile.imwrite(path, data, photometric="rgb")
    s = _quiet_read(path, channel=2)
    np.testing.assert_array_equal(np.asarray(s.data), data[..., 2])


def test_tcyx_requires_channel(tmp_path):
    data = np.random.default_rng(3).integers(0, 500, (4, 2, 6, 5), dtype=np.uint16)
    path = tmp_path / "tc.tif"
    tifffile.imwrite(path, data, imagej=True, metadata={"axes": "TCYX"})
    with pytest.raises(ValueError, match=r"tc.tif.*T=4 \(time\), C=2 \(channel\).*channel=0..1"):
        read_stack(path)
    s = _quiet_read(path, channel=1)
    np.testing.assert_array_equal(np.asarray(s.data), data[:, 1])
    assert s.metadata["channel"] == "channel 1 of 2 (C axis)"
    with pytest.raises(ValueError, match="channel=2 out of range"):
        read_stack(path, channel=2)


def test_tzyx_requires_projection(tmp_path):
    data = np.random.default_rng(4).integers(0, 500, (4, 3, 6, 5), dtype=np.uint16)
    path = tmp_path / "tz.tif"
    tifffile.imwrite(path, data, photometric="minisblack", metadata={"axes": "TZYX"})
    with pytest.raises(ValueError, match=r"Z=3 \(depth\).*projection='max'"):
        read_stack(path)
    np.testing.assert_array_equal(np.asarray(_quiet_read(path, projection="max").data), data.max(axis=1))
    mean = _quiet_read(path, projection="mean")
    np.testing.assert_allclose(np.asarray(mean.data), data.mean(axis=1), rtol=1e-6)
    assert mean.metadata["projection"] == "mean"


def test_singleton_axes_squeezed_and_z_only_stack_read_as_time(tmp_path):
    path = tmp_path / "tzc.tif"
    data = _stack(T=3)
    tifffile.imwrite(path, data[:, None, None], imagej=True, metadata={"axes": "TZCYX"})
    np.testing.assert_array_equal(np.asarray(_quiet_read(path).data), data)
    zpath = tmp_path / "z.tif"
    tifffile.imwrite(zpath, data, imagej=True, metadata={"axes": "ZYX"})
    s = _quiet_read(zpath)
    np.testing.assert_array_equal(np.asarray(s.data), data)
    assert _has(s.metadata["notes"], "axis Z (size 3) read as time")


# ---------------------------------------------------------------- bad stacks


def test_2d_image_and_too_few_frames(tmp_path):
    tifffile.imwrite(tmp_path / "flat.tif", np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="flat.tif: a single 2D image .* no time axis"):
        read_stack(tmp_path / "flat.tif")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "one.png")
    with pytest.raises(ValueError, match="one.png: a single 2D image"):
        read_stack(tmp_path / "one.png")
    tifffile.imwrite(tmp_path / "two.tif", np.zeros((2, 8, 8), np.uint8), photometric="minisblack")
    with pytest.raises(ValueError, match="only 2 frame"):
        read_stack(tmp_path / "two.tif")
    rgb_planes = np.zeros((3, 8, 8), np.uint8)  # what older tifffile wrote for 3 grey frames by default
    tifffile.imwrite(tmp_path / "grey3.tif", rgb_planes, photometric="rgb", planarconfig="separate")
    with pytest.raises(ValueError, match="photometric='minisblack'"):
        read_stack(tmp_path / "grey3.tif")
    (tmp_path / "movie.avi").write_bytes(b"RIFF")
    tifffile.imwrite(tmp_path / "chan.tif", np.zeros((5, 8, 8), np.uint8), imagej=True, metadata={"axes": "CYX"})
    with pytest.raises(ValueError, match="relabel them as frames"):
        read_stack(tmp_path / "chan.tif")
    with pytest.raises(ValueError, match="unsupported file type"):
        read_stack(tmp_path / "movie.avi")


def test_nan_inf_pixels_kept_and_warned(tmp_path):
    data = np.ones((4, 6, 6), np.float32) * np.arange(36, dtype=np.float32).reshape(6, 6)
    data[1, 2, 2] = np.nan
    data[3, 0, 0] = np.inf
    path = write_stack_tiff(tmp_path / "nan.tif", data, 1.0, [0, 1, 2, 3])
    with pytest.warns(StackWarning, match="NaN/inf"):
        s = read_stack(path)
    assert np.isnan(np.asarray(s.data)[1, 2, 2]) and np.isinf(np.asarray(s.data)[3, 0, 0])
    assert _has(s.metadata["warnings"], "2 NaN/inf pixels in frame(s) 1, 3")


def test_constant_frames_warned(tmp_path):
    data = _stack(T=5)
    data[2] = 0
    data[4] = 77
    path = write_stack_tiff(tmp_path / "blank.tif", data, 1.0, np.arange(5.0))
    with pytest.warns(StackWarning, match="constant"):
        s = read_stack(path)
    assert _has(s.metadata["warnings"], "frame(s) 2, 4 are constant")


def test_truncated_and_corrupt_tiff_name_the_file(tmp_path):
    good = write_stack_tiff(tmp_path / "good.tif", _stack(T=6, Y=64, X=64), 1.0, np.arange(6.0))
    raw = good.read_bytes()
    (tmp_path / "cut.tif").write_bytes(raw[: len(raw) // 2])
    for lazy in (False, True):
        with pytest.raises(ValueError, match="cut.tif.*truncated or corrupt"):
            _quiet_read(tmp_path / "cut.tif", lazy=lazy)
    zipped = write_stack_tiff(tmp_path / "z.tif", _stack(T=6, Y=64, X=64), 1.0, np.arange(6.0), compression="zlib")
    zraw = zipped.read_bytes()
    (tmp_path / "zcut.tif").write_bytes(zraw[: len(zraw) * 2 // 3])
    with pytest.raises(ValueError, match="zcut.tif"):
        _quiet_read(tmp_path / "zcut.tif")
    (tmp_path / "junk.tif").write_bytes(np.random.default_rng(0).bytes(2000))
    with pytest.raises(ValueError, match="junk.tif: not a readable TIFF"):
        read_stack(tmp_path / "junk.tif")
    frames = tmp_path / "frames"
    _write_png_frames(frames, [(1, "f1.png"), (2, "f2.png"), (3, "f3.png")])
    (frames / "f2.png").write_bytes((frames / "f2.png").read_bytes()[:40])
    with pytest.raises(ValueError, match="f2.png"):
        read_stack(frames)


# ---------------------------------------------------------------- lazy opening


def test_lazy_memmap_reads_single_frames(tmp_path, monkeypatch):
    data = _stack(T=6, Y=32, X=40)
    path = write_stack_tiff(tmp_path / "big.tif", data, 0.5, np.arange(6.0))
    monkeypatch.setattr(nio, "LAZY_THRESHOLD_MB", data.nbytes / 2**20 / 2)
    s = read_stack(path)
    assert s.metadata["lazy"] and isinstance(s.data, np.memmap)
    np.testing.assert_array_equal(s.frame(4), data[4])
    assert "not every frame" in s.metadata["value_check"]
    eager = read_stack(path, lazy=False)
    assert type(eager.data) is np.ndarray and not eager.metadata["lazy"]


def test_lazy_compressed_and_channel_selection(tmp_path):
    data = np.random.default_rng(5).integers(0, 500, (5, 2, 16, 12), dtype=np.uint16)
    path = tmp_path / "tc_zip.tif"
    tifffile.imwrite(path, data, imagej=True, metadata={"axes": "TCYX"}, compression="zlib")
    s = _quiet_read(path, channel=1, lazy=True)
    assert s.metadata["backend"] == "zarr"
    assert not isinstance(s.data, np.ndarray)
    gc.collect()  # the open file must outlive read_stack
    np.testing.assert_array_equal(s.frame(3), data[3, 1])
    np.testing.assert_array_equal(s.data[1:4, 2:5, -3:], data[1:4, 1, 2:5, -3:])
    np.testing.assert_array_equal(s.data[-1, ...], data[-1, 1])
    np.testing.assert_array_equal(np.asarray(s.data), data[:, 1])
    plain = tmp_path / "t_zip.tif"
    tifffile.imwrite(plain, data[:, 0], photometric="minisblack", compression="zlib")
    z = _quiet_read(plain, lazy=True)
    np.testing.assert_array_equal(np.asarray(z.data[2]), data[2, 0])


def test_lazy_folder_reads_files_on_demand(tmp_path):
    _write_png_frames(tmp_path / "f", [(5, "a1.png"), (6, "a2.png"), (7, "a3.png")])
    s = _quiet_read(tmp_path / "f", lazy=True)
    assert s.metadata["backend"] == "files" and s.data.shape == (3, 6, 7)
    (tmp_path / "f" / "a3.png").unlink()
    assert int(s.frame(1)[0, 0]) == 6  # frame 1 read without touching the deleted file


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096 / 2**20


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc to measure resident memory")
def test_200mb_stack_opens_without_loading(tmp_path):
    T, Y, X = 100, 1024, 1024  # 200 MiB of uint16, above the default lazy threshold
    frame = np.arange(Y * X, dtype=np.uint16).reshape(Y, X)
    path = tmp_path / "big.tif"
    frames = (frame + t for t in range(T))  # written frame by frame: the test itself stays small in memory
    tifffile.imwrite(path, frames, shape=(T, Y, X), dtype=np.uint16, imagej=True, metadata={"axes": "TYX"})
    assert path.stat().st_size > 200e6 and T * Y * X * 2 > nio.LAZY_THRESHOLD_MB * 2**20
    before = _rss_mb()
    s = _quiet_read(path)
    one = s.frame(57)
    grown = _rss_mb() - before
    assert type(s.data) is not np.ndarray and s.metadata["lazy"]
    np.testing.assert_array_equal(one, frame + 57)
    assert grown < 40, f"resident memory grew by {grown:.0f} MB opening a 200 MB stack"


# ---------------------------------------------------------------- shipped sample


def test_scratch_sample_loads():
    s = load_scratch_phase_contrast()
    assert s.shape == (11, 382, 382) and s.data.dtype == np.uint8
    np.testing.assert_array_equal(s.times_h, np.arange(11.0))
    assert s.pixel_size_um is None and _has(s.metadata["warnings"], "PIXEL SIZE UNKNOWN")
    assert "MIT" in s.metadata["attribution"]
    assert 100 < float(np.asarray(s.data).mean()) < 200
    data_dir = Path(nio.__file__).parent / "data"
    assert (data_dir / "LICENSE_scratch_phase_contrast.txt").read_text().startswith("MIT License")
    assert sum(f.stat().st_size for f in data_dir.iterdir()) <= 2 * 2**20
