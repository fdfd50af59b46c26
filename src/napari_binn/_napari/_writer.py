"""napari writer contribution: save the napari-binn results of the viewer as a results bundle folder.

No Qt here. The layers napari-binn makes carry ``metadata['napari_binn_state']``, the id of the viewer's shared
state, whose one result (density, BINN, equations, simulations, refits, QC, configuration) ``save_results`` writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["write_bundle"]


def write_bundle(path: str, layer_data: list[tuple[Any, dict, str]]) -> list[str]:
    """Write the napari-binn result behind the selected layers as a bundle folder at ``path``; returns [path].

    Raises ValueError when none of the layers was made by napari-binn (select the density or simulated layer).
    """
    from ..results import save_results
    from ._state import find_state

    state = None
    for _data, meta, _kind in layer_data:
        state = find_state((meta.get("metadata") or {}).get("napari_binn_state"))
        if state is not None:
            break
    if state is None or (state.field is None and state.fit is None):
        raise ValueError("None of the selected layers holds a napari-binn result: select the 'density' or "
                         "'simulated density' layer made by the napari-binn docks, then File > Save Selected Layers.")
    target = Path(path)
    if target.suffix and not target.exists():  # napari may append an extension to the name typed
        target = target.with_suffix("")
    return [str(save_results(state.result, target, overwrite=False))]
