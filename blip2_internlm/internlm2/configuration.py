"""InternLM2 configuration, read from the official ``config.json`` as it is."""

from __future__ import annotations

import copy
from typing import Any

from transformers import PretrainedConfig

# Architecture values of the public checkpoints. The chat/SFT variants share the
# sizes of their base model. Sources are listed in docs/internlm2.md.
_COMMON = {
    "vocab_size": 92544,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "dynamic", "factor": 2.0},
    "bias": False,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
}
PRESETS: dict[str, dict[str, Any]] = {
    "internlm2-1_8b": {
        **_COMMON,
        "hidden_size": 2048,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "intermediate_size": 8192,
    },
    "internlm2-7b": {
        **_COMMON,
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 14336,
    },
    "internlm2-20b": {
        **_COMMON,
        "hidden_size": 6144,
        "num_hidden_layers": 48,
        "num_attention_heads": 48,
        "num_key_value_heads": 8,
        "intermediate_size": 16384,
    },
}

# What the official config.json carries, so that files we write look like theirs.
OFFICIAL_AUTO_MAP = {
    "AutoConfig": "configuration_internlm2.InternLM2Config",
    "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
    "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
}

ROPE_SCALING_TYPES = ("linear", "dynamic")


class InternLM2Config(PretrainedConfig):
    r"""Configuration of an InternLM2 decoder.

    Keys and defaults follow the official ``configuration_internlm2.py`` so that a
    checkpoint's ``config.json`` (including keys we do not use, such as ``auto_map``
    or ``pretraining_tp``) loads unchanged and is written back unchanged.

    ``rope_scaling`` is ``None`` or ``{"type" | "rope_type": "linear" | "dynamic",
    "factor": float}``. The official files spell the key ``type``; the dict is kept
    as given and read through :attr:`rope_scaling_type` / :attr:`rope_scaling_factor`.

    The official ``attn_implementation`` key in ``config.json`` is dropped by
    ``PretrainedConfig.from_dict``; the backend is chosen with
    ``from_pretrained(..., attn_implementation="eager" | "sdpa")`` (default sdpa).
    """

    model_type = "internlm2"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 103168,
        hidden_size: int = 4096,
        intermediate_size: int = 11008,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 2048,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        pad_token_id: int | None = 0,
        bos_token_id: int | None = 1,
        eos_token_id: int | None = 2,
        tie_word_embeddings: bool = False,
        bias: bool = True,
        rope_theta: float = 10000.0,
        rope_scaling: dict | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.bias = bias
        self.rope_theta = rope_theta
        self.rope_scaling = copy.deepcopy(rope_scaling)
        self._validate()
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def _validate(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.rope_scaling is None:
            return
        if not isinstance(self.rope_scaling, dict):
            raise ValueError(f"rope_scaling must be a dict or None, got {self.rope_scaling!r}")
        kind, factor = self.rope_scaling_type, self.rope_scaling.get("factor")
        if kind not in ROPE_SCALING_TYPES:
            raise ValueError(f"rope_scaling type must be one of {ROPE_SCALING_TYPES}, got {self.rope_scaling!r}")
        if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor < 1.0:
            raise ValueError(f"rope_scaling factor must be a number >= 1, got {self.rope_scaling!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @head_dim.setter
    def head_dim(self, value: int) -> None:
        # Official configs have no head_dim key; accept one only if it agrees.
        if value != self.hidden_size // self.num_attention_heads:
            raise ValueError(f"head_dim={value} disagrees with hidden_size / num_attention_heads")

    @property
    def rope_scaling_type(self) -> str | None:
        if not self.rope_scaling:
            return None
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))

    @property
    def rope_scaling_factor(self) -> float:
        return float(self.rope_scaling["factor"]) if self.rope_scaling else 1.0

    @classmethod
    def preset(cls, name: str, **overrides) -> InternLM2Config:
        """Config of a public checkpoint's architecture, e.g. ``preset("internlm2-1_8b")``.

        Chat variants (``internlm2-chat-7b``) resolve to their base model.
        """
        key = name.split("/")[-1].replace("-chat", "").replace("-sft", "").replace("-base", "")
        if key not in PRESETS:
            raise KeyError(f"unknown InternLM2 preset {name!r}; known: {sorted(PRESETS)}")
        values = copy.deepcopy(PRESETS[key])
        values.update(overrides)
        values.setdefault("architectures", ["InternLM2ForCausalLM"])
        values.setdefault("auto_map", dict(OFFICIAL_AUTO_MAP))
        return cls(**values)


__all__ = ["InternLM2Config", "PRESETS", "OFFICIAL_AUTO_MAP"]
