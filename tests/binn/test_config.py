"""BinnConfig: defaults, validation, round trips, and the one way to change the step budget."""

import pytest

from napari_binn.binn import BinnConfig


def test_config_round_trip_and_validation():
    cfg = BinnConfig(steps=5, hidden=(8, 8), D_max=100.0)
    assert BinnConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="bogus"):
        BinnConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="D_min"):
        BinnConfig(D_min=10.0, D_max=1.0)
    with pytest.raises(ValueError, match="steps"):
        BinnConfig(steps=0)
    with pytest.raises(ValueError, match="device"):
        BinnConfig(device="tpu")
    for bad in (0.5, -1.0):
        with pytest.raises(ValueError, match="warmup_restore"):
            BinnConfig(warmup_restore=bad)


def test_with_steps_keeps_the_shares_of_the_phases():
    cfg = BinnConfig(steps=18000, warmup_steps=16000, rates_only_steps=900)
    short = cfg.with_steps(2000)
    assert (short.steps, short.warmup_steps, short.rates_only_steps) == (2000, 1778, 100)
    assert cfg.with_steps(18000) == cfg
    tiny = BinnConfig(steps=10, warmup_steps=10).with_steps(1)
    assert (tiny.steps, tiny.warmup_steps) == (1, 0)  # the PDE term always gets a step
    with pytest.raises(ValueError, match="steps"):
        cfg.with_steps(0)
