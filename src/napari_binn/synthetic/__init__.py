"""Synthetic data: ground-truth density fields from known PDEs and microscopy-like renderings of them."""
