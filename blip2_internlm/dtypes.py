"""The floating-point precisions a config or a command line may name, and their torch dtypes.

``fp32`` / ``fp16`` / ``bf16`` are the names LAVIS's configs use (``vit_precision``) and this
package's keys follow (``llm_precision``, ``--dtype``).
"""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """``fp32`` / ``fp16`` / ``bf16`` for those dtypes; any other dtype as torch spells it (``torch.float64``)."""
    return _NAMES.get(dtype, str(dtype))


def to_dtype(name: str, key: str = "dtype") -> torch.dtype:
    """The dtype ``name`` stands for; ``key`` (the config key or flag that gave it) names the value in the error."""
    try:
        return DTYPES[name]
    except (KeyError, TypeError):
        raise ValueError(f"{key} = {name!r}; expected one of {sorted(DTYPES)}") from None
