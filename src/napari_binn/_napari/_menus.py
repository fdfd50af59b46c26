"""Layer-context menu actions (napari injects the viewer)."""

from __future__ import annotations

import napari

__all__ = ["open_density_dock"]


def open_density_dock(viewer: napari.viewer.Viewer) -> None:
    """Open the napari-binn density dock for the selected image layer (Layers context menu)."""
    viewer.window.add_plugin_dock_widget("napari-binn", "Density extraction")
