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


def _napari_binn_imports() -> dict[str, set[str]]:
    """Module -> the napari_binn modules it imports (at the top or inside functions), from the source."""
    import ast
    from pathlib import Path

    root = Path(napari_binn.__file__).parent
    files = {}
    for f in root.rglob("*.py"):
        parts = list(f.relative_to(root.parent).with_suffix("").parts)
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    graph = {}
    for mod, f in files.items():
        package = mod.split(".") if f.name == "__init__.py" else mod.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                name = ".".join(base + ([node.module] if node.module else []))
                deps |= {n for n in [name, *(f"{name}.{a.name}" for a in node.names)] if n in files}
        graph[mod] = deps - {mod, "napari_binn"}  # the package itself only re-exports, lazily
    return graph


def test_core_modules_import_without_cycles():
    """No module imports itself back through others (e.g. pipeline -> symbolic -> results -> pipeline)."""
    graph = _napari_binn_imports()

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(d == goal or (d not in seen and not seen.add(d) and reaches(d, goal, seen)) for d in graph[start])

    cycles = sorted(m for m in graph if reaches(m, m, set()))
    assert not cycles, f"import cycles through {cycles}"
