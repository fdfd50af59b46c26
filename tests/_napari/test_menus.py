"""The manifest's menu contributions reach napari's menus (napari ignores menus plugins may not contribute to)."""

from __future__ import annotations

import pytest

pytest.importorskip("napari")


def _menu_command_ids(menu_id: str) -> list[str]:
    from napari._app_model import get_app_model

    return [item.command.id for item in get_app_model().menus.get_menu(menu_id) if hasattr(item, "command")]


def test_manifest_menus_are_contributable():
    from napari._app_model.constants._menus import is_menu_contributable
    from npe2 import PluginManifest

    from napari_binn import _napari  # noqa: F401  (the package whose manifest this is)

    manifest = PluginManifest.from_distribution("napari-binn")
    menus = manifest.contributions.menus or {}
    assert menus, "the manifest declares no menu items"
    for menu_id in menus:
        assert is_menu_contributable(menu_id), f"napari drops items in {menu_id!r}: not a contributable menu"


def test_layers_measure_menu_opens_the_density_dock(make_napari_viewer):
    from napari._app_model import get_app_model

    viewer = make_napari_viewer()
    assert "napari-binn.open_density_dock" in _menu_command_ids("napari/layers/measure")
    get_app_model().commands.execute_command("napari-binn.open_density_dock").result()
    docks = [name for name in viewer.window.dock_widgets if "Density extraction" in name]
    assert docks, f"no density dock among {list(viewer.window.dock_widgets)}"
