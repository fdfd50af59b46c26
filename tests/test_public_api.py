"""The public names promised in ARCHITECTURE.md exist, are documented, and importing the package is light."""

import subprocess
import sys

import pytest

import napari_binn

CONTRACT = ["read_stack", "Stack", "extract_density", "DensityField", "make_synthetic", "render_microscopy",
            "simulate", "fit_mechanistic", "BinnConfig", "train_binn", "fit_binn", "discover_equations",
            "PipelineConfig", "run_pipeline", "save_results", "load_results"]


@pytest.mark.parametrize("name", CONTRACT)
def test_public_name_exists_and_is_documented(name):
    obj = getattr(napari_binn, name)
    assert obj.__doc__ and len(obj.__doc__.strip()) > 20, f"{name} needs a docstring"
    assert name in napari_binn.__all__


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError):
        napari_binn.no_such_thing  # noqa: B018


def test_reader_import_does_not_load_torch():
    code = "import sys, napari_binn._napari._reader; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
