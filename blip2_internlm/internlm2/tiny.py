"""Moved to :mod:`blip2_internlm.tiny.internlm2`, with the other generated test assets.

An alias for the modules that still import it from here; it belongs to the ``tiny`` layer
(docs/architecture.md) and goes once they import ``blip2_internlm.tiny.internlm2``.
"""

from blip2_internlm.tiny.internlm2 import (  # noqa: F401
    BUILTIN_CORPUS,
    CHAT_TOKENS,
    SPM_TRAINER_OPTIONS,
    TINY_CONFIG,
    build_tiny_internlm2,
    tokenizer_config,
    train_tokenizer_model,
)
