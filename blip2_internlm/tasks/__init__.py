"""Tasks this package adds to LAVIS's registry."""

from blip2_internlm.tasks import (
    captioning,  # noqa: F401  (registers captioning_offline)
    instruction_tuning,  # noqa: F401  (registers instruction_tuning)
    mmbench,  # noqa: F401  (registers mmbench)
)
