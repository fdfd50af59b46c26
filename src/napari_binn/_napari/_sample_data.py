"""Sample data contributions (File > Open Sample > napari-binn)."""

from __future__ import annotations

from ..io import load_scratch_phase_contrast
from ._reader import stack_to_layer_data


def scratch_phase_contrast_sample():
    """The real phase-contrast scratch assay shipped with the plugin (11 frames, 1 h apart; MIT licence)."""
    return [stack_to_layer_data(load_scratch_phase_contrast())]


def synthetic_spreading_sample():
    """Rendered nuclei of a scratch closing under a known Fisher–KPP equation, with the exact density."""
    from ..synthetic.sample import SAMPLE_PARAMS, spreading_sample

    sample = spreading_sample()
    rendered = sample.rendered
    px = rendered.stack.pixel_size_um
    equation = ("u_t = D Δu + r u (1 - u/K), D = {D:g} µm²/h, r = {r:g} /h, K = {K:g} cells/mm²"
                .format(**SAMPLE_PARAMS))
    image_meta = {"times_h": rendered.stack.times_h.tolist(), "pixel_size_um": px, "equation": equation,
                  "napari_binn": {"kind": "synthetic nuclei"}}
    # Box (i, j) covers pixels i*b .. (i+1)*b - 1: its centre lies at (i*b + (b-1)/2) pixels.
    box_um = rendered.box_px * px
    offset_um = (rendered.box_px - 1) / 2 * px
    density_meta = {"times_h": rendered.stack.times_h.tolist(), "units": sample.field.units,
                    "napari_binn": {"kind": "true density"}, "equation": equation}
    return [
        (rendered.stack.data, {"name": "synthetic nuclei (Fisher–KPP)", "scale": (1.0, px, px),
                               "metadata": image_meta, "colormap": "gray"}, "image"),
        (sample.field.u, {"name": "true density (cells/mm²)", "scale": (1.0, box_um, box_um),
                          "translate": (0.0, offset_um, offset_um), "colormap": "magma", "opacity": 0.5,
                          "visible": False, "metadata": density_meta}, "image"),
    ]
