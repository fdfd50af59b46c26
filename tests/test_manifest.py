"""The napari manifest: one file at the top level, found by napari from the installed package and the wheel."""

import importlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_manifest_loads_from_installed_package():
    npe2 = pytest.importorskip("npe2")
    pm = npe2.PluginManager()
    pm.discover()
    manifest = pm.get_manifest("napari-binn")
    assert manifest.display_name == "napari-binn"
    commands = {c.id for c in manifest.contributions.commands}
    assert "napari-binn.get_reader" in commands
    assert manifest.contributions.sample_data
    for command in manifest.contributions.commands:
        # every python_name must import and resolve to a callable
        module, _, attr = command.python_name.partition(":")
        target = importlib.import_module(module)
        for part in attr.split("."):
            target = getattr(target, part)
        assert callable(target), command.python_name


def test_package_manifest_is_the_top_level_file():
    packaged = ROOT / "src" / "napari_binn" / "napari.yaml"
    assert packaged.read_text() == (ROOT / "napari.yaml").read_text()


def test_npe2_validate_cli():
    result = subprocess.run(
        [sys.executable, "-m", "npe2", "validate", "napari-binn"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in (result.stdout + result.stderr).lower()


def test_wheel_carries_the_manifest(tmp_path):
    pytest.importorskip("npe2")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True,
    )
    if result.returncode != 0 and "setuptools" in result.stderr:
        pytest.skip("setuptools is not installed in this environment: " + result.stderr[-200:])
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("napari_binn-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert "napari_binn/napari.yaml" in names
        text = zf.read("napari_binn/napari.yaml").decode()
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        eps = zf.read(entry_points).decode()
    assert text == (ROOT / "napari.yaml").read_text()
    assert "napari-binn = napari_binn:napari.yaml" in eps
    from npe2 import PluginManifest

    (tmp_path / "napari.yaml").write_text(text)
    PluginManifest.from_file(tmp_path / "napari.yaml")
