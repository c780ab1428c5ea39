"""Native InternLM2 (config, model, tokenizer) for transformers, reading official checkpoints.

Call :func:`register_auto_classes` once to make ``AutoConfig`` / ``AutoModel`` /
``AutoModelForCausalLM`` / ``AutoTokenizer`` resolve ``model_type: internlm2`` here.
"""

from __future__ import annotations

from .configuration import OFFICIAL_AUTO_MAP, PRESETS, InternLM2Config
from .errors import InternLM2CheckpointError
from .modeling import InternLM2ForCausalLM, InternLM2Model, InternLM2PreTrainedModel
from .tokenization import InternLM2Tokenizer, newline_token_id


def register_auto_classes() -> None:
    """Register the native classes with the transformers Auto* factories (idempotent).

    Once ``internlm2`` is a registered model type, transformers treats the official
    checkpoints' ``auto_map`` as optional remote code: without ``trust_remote_code``
    the native classes load (no prompt, no modeling file needed); with
    ``trust_remote_code=True`` the checkpoint's own code is used, as before.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    # exist_ok makes a second call (or a re-import) a no-op rather than an error.
    AutoConfig.register(InternLM2Config.model_type, InternLM2Config, exist_ok=True)
    AutoModel.register(InternLM2Config, InternLM2Model, exist_ok=True)
    AutoModelForCausalLM.register(InternLM2Config, InternLM2ForCausalLM, exist_ok=True)
    AutoTokenizer.register(InternLM2Config, slow_tokenizer_class=InternLM2Tokenizer, exist_ok=True)


__all__ = [
    "InternLM2Config",
    "PRESETS",
    "OFFICIAL_AUTO_MAP",
    "InternLM2PreTrainedModel",
    "InternLM2Model",
    "InternLM2ForCausalLM",
    "InternLM2Tokenizer",
    "InternLM2CheckpointError",
    "newline_token_id",
    "register_auto_classes",
]
