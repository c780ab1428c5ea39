"""BLIP-2 with a frozen InternLM2, as a LAVIS plugin.

Importing this package makes LAVIS 1.0.2 work on the pinned stack (``blip2_internlm.compat``),
imports ``lavis``, registers this package's models, datasets and tasks with LAVIS's
registry and the native InternLM2 with transformers' Auto classes.  It is idempotent.
"""

from blip2_internlm import compat

compat.prepare_imports()

import lavis  # noqa: E402,F401  (must follow prepare_imports)

compat.patch_lavis()

from blip2_internlm.internlm2 import register_auto_classes  # noqa: E402

register_auto_classes()

from blip2_internlm import datasets, models, processors, tasks, tiny  # noqa: E402,F401  (registration)
from blip2_internlm.inference import load_model_and_preprocess  # noqa: E402,F401  (own weights in one call)

__version__ = "0.1.0"
