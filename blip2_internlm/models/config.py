"""The model configs: every ``model:`` key of the BLIP-2 models this package builds, with its default and its check.

A LAVIS YAML (the model type's file under the project config's ``model:``, plus ``--options``)
becomes one of these dataclasses through ``from_lavis``; an unknown key is an error that names
the closest known one.  Constructors take the dataclass, never ``cfg.get(..., default)``, so a
default is written once, here.  The LAVIS bookkeeping keys (``arch``, ``model_type``,
``load_pretrained``, ``pretrained``, ...) are fields too: ``load_checkpoint_from_config`` reads them.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

from blip2_internlm.settings import did_you_mean

VIT_PRECISIONS = ("fp16", "fp32")
LLM_PRECISIONS = ("auto", "fp32", "fp16", "bf16")
AUTOCAST_DTYPES = ("auto", "bf16", "fp16", "off")
ATTN_IMPLEMENTATIONS = (None, "eager", "sdpa")
DECODE_IMPLEMENTATIONS = ("static", "transformers")
CPU_FP32_LINEARS = ("auto", "onednn", "torch")


def _choice(*allowed):
    return {"choices": allowed}


@dataclass(frozen=True)
class ModelConfig:
    """Keys every LAVIS model config carries; LAVIS's ``BaseModel.load_checkpoint_from_config`` reads them."""

    arch: str = ""
    model_type: str | None = None
    load_pretrained: bool = False
    load_finetuned: bool = False
    pretrained: str | None = None
    finetuned: str | None = None

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_lavis(cls, cfg):
        """From a LAVIS model config (DictConfig or dict): unknown keys and bad values are errors naming the key."""
        values = dict(cfg.items())
        known = cls.keys()
        unknown = sorted(set(values) - set(known))
        if unknown:
            hints = [
                f"{key!r} (did you mean {close!r}?)" if close else repr(key)
                for key in unknown
                for close in [did_you_mean(key, known)]
            ]
            raise ValueError(
                f"unknown keys in model config for {values.get('arch') or cls.__name__}: {', '.join(hints)}; "
                f"known: {sorted(known)}"
            )
        return cls(**values)

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            choices = field.metadata.get("choices")
            if value is False and choices is not None and "off" in choices:
                # YAML 1.1 (a config file, or --options model.autocast_dtype=off) reads an unquoted off as false
                value = "off"
                object.__setattr__(self, field.name, value)
            _check_type(field.name, value, hints[field.name])
            if choices is not None and value not in choices:
                raise ValueError(f"model.{field.name} = {value!r}; expected one of {[c for c in choices]}")
            minimum = field.metadata.get("min")
            if minimum is not None and value < minimum:
                raise ValueError(f"model.{field.name} = {value!r}; must be >= {minimum}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_type(name: str, value, hint) -> None:
    allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, _UnionType) else (hint,)
    if value is None:
        if type(None) not in allowed:
            raise ValueError(f"model.{name} must be set (got null)")
        return
    for kind in allowed:
        if kind is type(None):
            continue
        if kind is bool and isinstance(value, bool):
            return
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return
        if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
            return
        if kind is str and isinstance(value, str):
            return
        if kind is dict and hasattr(value, "items"):
            return
    names = " or ".join(k.__name__ for k in allowed if k is not type(None))
    raise ValueError(f"model.{name} = {value!r} ({type(value).__name__}); expected {names}")


_UnionType = type(int | None)


@dataclass(frozen=True)
class VisionQformerConfig(ModelConfig):
    """The frozen ViT and the Q-Former, as LAVIS's BLIP-2 models read them (LAVIS's defaults), plus where their
    weights come from (``vit_weights``, ``qformer_text_model``: see ``blip2_internlm.assets``)."""

    vit_model: str = "eva_clip_g"
    vit_weights: str | None = None
    image_size: int = dataclasses.field(default=224, metadata={"min": 1})
    drop_path_rate: float = dataclasses.field(default=0.0, metadata={"min": 0})
    use_grad_checkpoint: bool = False
    vit_precision: str = dataclasses.field(default="fp16", metadata=_choice(*VIT_PRECISIONS))
    freeze_vit: bool = True
    qformer_text_model: str = "bert-base-uncased"
    num_query_token: int = dataclasses.field(default=32, metadata={"min": 1})
    cross_attention_freq: int = dataclasses.field(default=2, metadata={"min": 1})
    max_txt_len: int = dataclasses.field(default=32, metadata={"min": 1})


@dataclass(frozen=True)
class Stage1Config(VisionQformerConfig):
    """LAVIS's stage-1 ``blip2`` (``Blip2Qformer``): its keys and defaults, and the asset keys."""

    arch: str = "blip2"
    embed_dim: int = dataclasses.field(default=256, metadata={"min": 1})

    def lavis_kwargs(self) -> dict:
        """``Blip2Qformer.__init__``'s arguments."""
        return dict(
            vit_model=self.vit_model,
            img_size=self.image_size,
            drop_path_rate=self.drop_path_rate,
            use_grad_checkpoint=self.use_grad_checkpoint,
            vit_precision=self.vit_precision,
            freeze_vit=self.freeze_vit,
            num_query_token=self.num_query_token,
            cross_attention_freq=self.cross_attention_freq,
            embed_dim=self.embed_dim,
            max_txt_len=self.max_txt_len,
        )


@dataclass(frozen=True)
class Blip2InternLMConfig(VisionQformerConfig):
    """``blip2_internlm`` and ``blip2_opt_baseline``: the frozen decoder-only LLM and how it runs."""

    arch: str = "blip2_internlm"
    #: a local checkpoint directory, a hub name already in the local cache, or ``tiny`` / ``tiny-opt``
    llm_model: str = "tiny"
    #: the frozen LLM's weights; auto: bf16 where the device multiplies it natively (a GPU with bf16, a CPU
    #: with AVX512-BF16 or AMX), fp16 on an older GPU, fp32 on any other CPU (blip2_internlm.hardware)
    llm_precision: str = dataclasses.field(default="auto", metadata=_choice(*LLM_PRECISIONS))
    prompt: str = ""
    apply_lemmatizer: bool = False
    #: ViT, Q-Former and LLM attention: null reads $BLIP2_INTERNLM_ATTN, else sdpa
    attn_implementation: str | None = dataclasses.field(default=None, metadata=_choice(*ATTN_IMPLEMENTATIONS))
    #: the autocast region of ViT, Q-Former and LLM; LAVIS's ``maybe_autocast`` is fp16 (the InternLM2 model
    #: types set auto: bf16 where the device multiplies it natively, fp16 on an older GPU, none on other CPUs)
    autocast_dtype: str = dataclasses.field(default="fp16", metadata=_choice(*AUTOCAST_DTYPES))
    llm_grad_checkpoint: bool = False
    llm_train_kv_cache: bool = True
    lm_head_on_labels_only: bool = True
    #: the LLM's decoding loop (models/decode.py): static (the prefix once per image, shared by its beams) or
    #: transformers (llm.generate as it is)
    decode_implementation: str = dataclasses.field(default="static", metadata=_choice(*DECODE_IMPLEMENTATIONS))
    #: torch.compile the static loop's step; null (auto): on CUDA only (where it pays)
    decode_compile: bool | None = None
    #: the static step's linear layers over weights packed once for oneDNN (bf16 on a CPU: same results,
    #: faster; one more copy of the LLM's linear weights); null (auto): wherever oneDNN runs the LLM's bf16
    decode_prepack: bool | None = None
    #: fp32 linear layers on a CPU (models/cpu_linear.py): onednn (oneDNN's matmul; results differ from
    #: torch's by fp32 rounding), torch (F.linear as it is); auto: whichever this CPU runs faster, measured
    #: once per machine (blip2_internlm.hardware)
    cpu_fp32_linear: str = dataclasses.field(default="auto", metadata=_choice(*CPU_FP32_LINEARS))

    def __post_init__(self):
        super().__post_init__()
        if self.autocast_dtype == "off" and self.vit_precision == "fp16":
            raise ValueError(
                "model.autocast_dtype: off with vit_precision: fp16 cannot run: LAVIS's fp16 ViT keeps its "
                "LayerNorms in fp32 and works only under autocast; set vit_precision: fp32"
            )


@dataclass(frozen=True)
class Blip2InternLMInstructConfig(Blip2InternLMConfig):
    """``blip2_internlm_instruct``: instruction-aware Q-Former, a chat template, optional LoRA on the LLM."""

    arch: str = "blip2_internlm_instruct"
    #: how a conversation becomes the LLM's text (models/chat_template.py): plain (base models) or
    #: internlm2_chat (InternLM2-chat's <|im_start|> turns)
    chat_template: str = dataclasses.field(default="plain", metadata=_choice("plain", "internlm2_chat"))
    #: put in front of every conversation as its system message ("": none)
    system_prompt: str = ""
    #: the instruction's tokens join the queries in the Q-Former's self-attention (InstructBLIP)
    qformer_text_input: bool = True
    #: the Q-Former reads at most this many instruction tokens (the latest ones: truncated on the left)
    max_instruction_len: int = dataclasses.field(default=128, metadata={"min": 1})
    #: LoRA adapters on the frozen LLM: null, or {r, alpha, dropout, target_modules, load_in_4bit} (models/lora.py)
    llm_lora: dict | None = None
    max_txt_len: int = dataclasses.field(default=256, metadata={"min": 1})

    def __post_init__(self):
        super().__post_init__()
        from blip2_internlm.models.lora import LoraSettings

        lora = LoraSettings.from_config(self.llm_lora)
        object.__setattr__(self, "llm_lora", lora.to_dict() if lora else None)

    @property
    def lora(self):
        from blip2_internlm.models.lora import LoraSettings

        return LoraSettings.from_config(self.llm_lora)
