"""Synthetic data: ground-truth density fields from known PDEs and microscopy-like renderings of them."""

from .models import MODELS, Truth, make_synthetic
from .render import RenderedStack, render_microscopy

__all__ = ["make_synthetic", "Truth", "MODELS", "render_microscopy", "RenderedStack"]
