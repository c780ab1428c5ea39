"""Where the package's own YAML files are, and the repository's run configs next to it.

The package ships its defaults (model types, dataset builders, benchmark sizes) under
``blip2_internlm/configs``; LAVIS's registries want absolute paths to them.  The repository's
``configs/`` (the run configs passed as ``--cfg-path``) is beside the package in a checkout and
absent from an installed wheel: tools that default to one of them check it exists.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
#: The package's configs: ``models/`` (model types), ``datasets/`` (builders), ``bench/`` (sizes).
CONFIG_DIR = PACKAGE_DIR / "configs"
MODEL_CONFIG_DIR = CONFIG_DIR / "models"
DATASET_CONFIG_DIR = CONFIG_DIR / "datasets"
SHAPES_DATASET_CONFIG_DIR = DATASET_CONFIG_DIR / "shapes"
BENCH_CONFIG_DIR = CONFIG_DIR / "bench"

#: The repository's run configs (``configs/blip2_internlm``, ``configs/blip2_opt``, ``configs/tiny``).
REPO_CONFIG_DIR = PACKAGE_DIR.parent / "configs"
TINY_RUN_CONFIG_DIR = REPO_CONFIG_DIR / "tiny"
