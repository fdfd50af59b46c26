import pytest

from napari_binn.pipeline import PipelineConfig


def test_toml_roundtrip(tmp_path):
    cfg = PipelineConfig()
    cfg.density.box_um = 40.0
    cfg.density.params = {"nucleus_diameter_um": [5.0, 12.0], "threshold": "li"}
    cfg.binn = cfg.binn.replace(steps=123, hidden=(32, 16), D_max=5000.0)
    cfg.symbolic.backend = "library"
    cfg.refit.reference_model = "porous_fisher"
    path = tmp_path / "c.toml"
    cfg.to_toml(path)
    again = PipelineConfig.from_toml(path)
    assert again == cfg
    assert again.binn.hidden == (32, 16)


def test_a_setting_unset_where_its_default_is_not_survives_the_round_trip(tmp_path):
    """refit.holdout_bic_switch = None means "never switch"; TOML has no null, and leaving the key out read back as
    the default 100, so a saved configuration (and every results bundle's config.toml) switched again. It is written
    as "none"; "none" is refused where the default is already None (leave it out) and for settings that cannot be
    None."""
    cfg = PipelineConfig()
    cfg.refit.holdout_bic_switch = None
    path = tmp_path / "c.toml"
    cfg.to_toml(path)
    assert 'holdout_bic_switch = "none"' in path.read_text()
    again = PipelineConfig.from_toml(path)
    assert again.refit.holdout_bic_switch is None and again == cfg
    PipelineConfig().to_toml(path)
    assert '"none"' not in path.read_text() and PipelineConfig.from_toml(path) == PipelineConfig()
    for text, message in [('[refit]\nholdout_bic_switch = "never"\n', r'finite number \(or "none" to unset it\)'),
                          ('[refit]\nholdout_frames = "none"\n', r"whole number \(or leave it out\)"),
                          ('[refit]\nmax_evals = "none"\n', r"refit\.max_evals must be a whole number; got 'none'"),
                          ('[refit]\ndelay_check = "often"\n', r'finite number \(or "none" to unset it\)')]:
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            PipelineConfig.from_toml(path)


def test_unknown_keys_are_named(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[density]\nbox_size = 40\n")
    with pytest.raises(ValueError, match="box_size"):
        PipelineConfig.from_toml(path)
    path.write_text("[binn]\nstep = 10\n")
    with pytest.raises(ValueError, match="'step'"):
        PipelineConfig.from_toml(path)
    path.write_text("[densty]\nmethod = 'nuclei'\n")
    with pytest.raises(ValueError, match="densty"):
        PipelineConfig.from_toml(path)


def test_invalid_value_is_reported(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[binn]\nD_min = 10.0\nD_max = 1.0\n")
    with pytest.raises(ValueError, match="D_min"):
        PipelineConfig.from_toml(path)
    path.write_text("not toml [")
    with pytest.raises(ValueError, match="TOML"):
        PipelineConfig.from_toml(path)


def test_configuration_docs_are_current():
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("make_config_docs", root / "scripts" / "make_config_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (root / "docs" / "configuration.md").read_text(encoding="utf-8") == module.render(), (
        "docs/configuration.md is out of date: run scripts/make_config_docs.py")
