"""Fixes that must be in place before LAVIS's modules execute."""

import warnings

from blip2_internlm.compat.fixes import fix

_MOVED_TO_PYTORCH_UTILS = ("apply_chunking_to_forward", "find_pruneable_heads_and_indices", "prune_linear_layer")


@fix
def restore_moved_transformers_helpers():
    """LAVIS imports three helpers from transformers.modeling_utils; they now live in transformers.pytorch_utils."""
    import transformers.modeling_utils as modeling_utils
    import transformers.pytorch_utils as pytorch_utils

    for name in _MOVED_TO_PYTORCH_UTILS:
        if not hasattr(modeling_utils, name):
            setattr(modeling_utils, name, getattr(pytorch_utils, name))


@fix
def quiet_timm_deprecated_import_paths():
    """timm 1.x still serves LAVIS's timm 0.4 import paths but warns on each; the paths are LAVIS's, not the user's."""
    warnings.filterwarnings(
        "ignore",
        message=r"Importing from timm\.models\.(hub|registry|layers|helpers) is deprecated",
        category=FutureWarning,
    )
