"""Sample data contributions (File > Open Sample > napari-binn)."""

from __future__ import annotations

from ..io import load_scratch_phase_contrast
from ._reader import stack_to_layer_data


def scratch_phase_contrast_sample():
    """The real phase-contrast scratch assay shipped with the plugin (11 frames, 1 h apart; MIT licence)."""
    return [stack_to_layer_data(load_scratch_phase_contrast())]
