"""Shared, evented state of the napari-binn docks: one instance per viewer, holding one core PipelineResult.

The docks' work is one :class:`~napari_binn.pipeline.PipelineResult` (``state.result``): the density dock puts in
the field, the training dock the BINN, the results dock the equations, simulations, mechanistic refits and QC, each
with its settings in ``result.config``. A dock replaces the result with :meth:`BinnState.update` (never changes it
in place), so ``state.events.result`` tells the others and a result made in one dock appears in the next without
re-selecting anything; exporting writes exactly this result (``save_results``), and opening a bundle makes it the
result.

The open docks of a viewer are also registered here (:func:`register_dock`, :func:`find_dock`), so a dock can read
another's current form (the per-shape batch dock runs with the density dock's settings) without any copy of it.
"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Any

from psygnal import Signal, evented

__all__ = ["BinnState", "get_state", "LAYER_NAMES", "register_state_id", "find_state", "DockRegistry",
           "get_docks", "register_dock", "unregister_dock", "find_dock"]

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


def _empty_result() -> Any:
    from .. import __version__
    from ..pipeline import PipelineConfig, PipelineResult

    return PipelineResult(PipelineConfig(), metadata={"napari_binn_version": __version__})


@evented
@dataclass(eq=False)
class BinnState:
    """What the docks share (GUI-free objects from the core).

    result: the PipelineResult of the docks' work (field: DensityField; fit: BinnFit; equations: Equations;
    simulations: name -> (T, Ny, Nx) array in the field's units; mechanistic: name -> MechanisticFit; qc:
    QCReport; config: the PipelineConfig the docks ran with). Read its parts with the shortcuts below; change them
    with :meth:`update`. stack: the Stack the density came from. source_layer: name of the image layer of the
    data. bundle: the bundle the result was opened from or last exported to.
    """

    result: Any = dc_field(default_factory=_empty_result)
    stack: Any = None
    source_layer: str = ""
    bundle: str = ""

    def update(self, **parts: Any) -> None:
        """Replace parts of the shared result (``field=``, ``fit=``, ``equations=``, ``simulations=``,
        ``mechanistic=``, ``qc=``, ``config=``, ``metadata=``): one new PipelineResult, one ``events.result``."""
        self.result = dataclasses.replace(self.result, **parts)

    @property
    def config(self) -> Any:
        return self.result.config

    @property
    def field(self) -> Any:
        return self.result.field

    @property
    def fit(self) -> Any:
        return self.result.fit

    @property
    def equations(self) -> Any:
        return self.result.equations

    @property
    def simulations(self) -> dict:
        return self.result.simulations

    @property
    def mechanistic(self) -> dict:
        return self.result.mechanistic

    @property
    def qc(self) -> Any:
        return self.result.qc

    @property
    def metadata(self) -> dict:
        return self.result.metadata


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


class DockRegistry:
    """The open napari-binn docks of one viewer, by role ('density', 'training', 'results').

    Only weak references are kept: a dock that closes unregisters itself (in its ``shutdown``), and a deleted one
    is forgotten. ``changed(role)`` is emitted when a dock of that role registers or unregisters.
    """

    changed = Signal(str)

    def __init__(self) -> None:
        self._docks: dict[str, weakref.ref] = {}

    def register(self, role: str, widget: Any) -> None:
        self._docks[role] = weakref.ref(widget)
        self.changed.emit(role)

    def unregister(self, role: str, widget: Any) -> None:
        if self.get(role) is widget:
            del self._docks[role]
            self.changed.emit(role)

    def get(self, role: str) -> Any | None:
        ref = self._docks.get(role)
        widget = ref() if ref is not None else None
        if widget is None and ref is not None:
            del self._docks[role]
        return widget


_DOCKS: "weakref.WeakKeyDictionary[Any, DockRegistry]" = weakref.WeakKeyDictionary()


def get_docks(viewer: Any) -> DockRegistry:
    """The dock registry of ``viewer`` (created on first use; keyed by the viewer itself, as :func:`get_state`)."""
    viewer = getattr(viewer, "__wrapped__", viewer)
    docks = _DOCKS.get(viewer)
    if docks is None:
        docks = DockRegistry()
        _DOCKS[viewer] = docks
    return docks


def register_dock(viewer: Any, role: str, widget: Any) -> None:
    """Record ``widget`` as the open dock of ``role`` in ``viewer`` (the latest one of a role wins)."""
    get_docks(viewer).register(role, widget)


def unregister_dock(viewer: Any, role: str, widget: Any) -> None:
    """Forget ``widget`` (closing); a no-op when another dock of that role has registered since."""
    get_docks(viewer).unregister(role, widget)


def find_dock(viewer: Any, role: str) -> Any | None:
    """The open dock of ``role`` in ``viewer``, or None."""
    return get_docks(viewer).get(role)
