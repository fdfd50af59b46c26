"""Shared, evented state of the napari-binn docks: one instance per viewer.

The density dock sets ``stack``/``field``, the training dock ``fit``, the results dock ``equations``,
``simulations`` and ``qc``; each dock listens to ``state.events.<name>`` so a result made in one dock appears
in the next without re-selecting anything.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Any

from psygnal import evented

__all__ = ["BinnState", "get_state", "LAYER_NAMES", "register_state_id", "find_state"]

#: Names of the layers the plugin creates (reused on re-runs, never duplicated).
LAYER_NAMES = {
    "roi": "napari-binn ROI",
    "nuclei": "detected nuclei (preview)",
    "preview": "density preview",
    "density": "density",
    "simulated": "simulated density",
    "residual": "residual (observed − simulated)",
    "contour": "simulated front (contour)",
}


@evented
@dataclass(eq=False)
class BinnState:
    """What the three docks share (all GUI-free objects from the core).

    stack: the Stack the density came from. field: DensityField (u in its units, grid in µm, times in h).
    fit: BinnFit. equations: Equations (or LoadedEquations from a bundle). simulations: name -> (T, Ny, Nx)
    array in the field's units. qc: QCReport. source_layer: name of the image layer of the data.
    """

    stack: Any = None
    field: Any = None
    fit: Any = None
    equations: Any = None
    simulations: dict = dc_field(default_factory=dict)
    qc: Any = None
    source_layer: str = ""
    bundle: str = ""


_STATES: "weakref.WeakKeyDictionary[Any, BinnState]" = weakref.WeakKeyDictionary()


def get_state(viewer: Any) -> BinnState:
    """The one shared state of ``viewer`` (created on first use).

    napari hands each dock a ``PublicOnlyProxy`` of the viewer; the state is keyed by the viewer itself.
    """
    viewer = getattr(viewer, "__wrapped__", viewer)
    state = _STATES.get(viewer)
    if state is None:
        state = BinnState()
        _STATES[viewer] = state
        register_state_id(state)
    return state


_BY_ID: "weakref.WeakValueDictionary[int, BinnState]" = weakref.WeakValueDictionary()


def register_state_id(state: BinnState) -> int:
    """Make ``state`` findable by ``id(state)`` (stored in the metadata of the layers the plugin makes)."""
    _BY_ID[id(state)] = state
    return id(state)


def find_state(state_id: Any) -> BinnState | None:
    """The live state whose id a layer carries in ``metadata['napari_binn_state']``, or None."""
    try:
        return _BY_ID.get(int(state_id))
    except (TypeError, ValueError):
        return None
