"""napari integration: reader, widgets, sample data and layer conversion (the only place napari/Qt are used)."""
