"""Datasets this package adds to LAVIS's registry."""

from blip2_internlm.datasets import builders  # noqa: F401  (registers shapes_caption, shapes_vqa)
