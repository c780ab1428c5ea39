"""Datasets this package adds to LAVIS's registry."""

from blip2_internlm.datasets import (
    builders,  # noqa: F401  (registers shapes_caption, shapes_vqa)
    chinese_captions,  # noqa: F401,E402  (registers the Chinese caption corpora)
    conversations,  # noqa: F401  (registers llava_conversations)
    mmbench,  # noqa: F401  (registers mmbench)
)
