"""The two models under test at a bench size: LAVIS 1.0.2's ``Blip2OPT`` and ours.

Sizes are YAML files in ``blip2_internlm/configs/bench``.  Both sides share the EVA ViT, the
Q-Former (a BERT config of the size), the LLM's width, depth, heads and vocabulary size; the
InternLM2 SwiGLU width is chosen so its MLP has OPT's MLP parameter count.  The model directories
hold configs and tokenizers, never weights: every weight is random (or ``meta`` for a shape-only
build), so the ``real`` size needs no downloads.  The fixes the baseline needs on this stack are
applied only while the bench runs: :func:`lavis_opt_random_weights`, :func:`lavis_opt_generation`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from pathlib import Path
from unittest import mock

import torch

from blip2_internlm.dtypes import DTYPES
from blip2_internlm.paths import BENCH_CONFIG_DIR

# --- sizes -----------------------------------------------------------------------------------


def size_names() -> list[str]:
    return sorted(p.stem for p in BENCH_CONFIG_DIR.glob("*.yaml"))


def load_size(name: str) -> dict:
    from omegaconf import OmegaConf

    path = BENCH_CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"--size {name!r}: no {path}; sizes: {size_names()}")
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    required = {
        "image_size",
        "batch_size",
        "vit_model",
        "qformer",
        "num_query_token",
        "cross_attention_freq",
        "llm",
        "caption_tokens",
        "vqa_tokens",
        "precision",
    }
    missing = sorted(required - set(cfg))
    if missing:
        raise ValueError(f"{path} lacks keys {missing}")
    return cfg


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


# --- model directories: configs and tokenizers, no weights --------------------------------------


def qformer_dir(size: dict) -> Path:
    """A BERT directory (config + the tiny BERT's vocab) of the size's Q-Former."""
    from transformers import BertConfig

    from blip2_internlm.assets import generated, resolve_text_model

    source = resolve_text_model("tiny")  # its directory name carries its vocabulary's digest

    def build(out: Path) -> None:
        for name in ("vocab.txt", "tokenizer_config.json"):
            shutil.copy(source / name, out / name)
        vocab = len((out / "vocab.txt").read_text(encoding="utf-8").splitlines())
        BertConfig(vocab_size=vocab, max_position_embeddings=512, **size["qformer"]).to_json_file(out / "config.json")

    return generated(f"bench-bert-{_digest([size['qformer'], source.name])}", build)


def internlm2_config(size: dict):
    from blip2_internlm.internlm2.configuration import InternLM2Config

    llm = size["llm"]
    return InternLM2Config.preset(
        "internlm2-1_8b",
        hidden_size=llm["hidden_size"],
        num_hidden_layers=llm["num_hidden_layers"],
        num_attention_heads=llm["num_attention_heads"],
        num_key_value_heads=llm.get("num_key_value_heads", llm["num_attention_heads"]),
        intermediate_size=llm["internlm2_intermediate_size"],
        vocab_size=llm["vocab_size"],
        max_position_embeddings=llm.get("max_position_embeddings", 512),
    )


def opt_config(size: dict):
    from transformers import OPTConfig

    from blip2_internlm.models.architectures import OPT_COMMON

    llm = size["llm"]
    return OPTConfig(
        **{
            **OPT_COMMON,  # facebook/opt-* settings (ReLU, pre-LN, dropout 0.1, tied embeddings)
            "vocab_size": llm["vocab_size"],
            "hidden_size": llm["hidden_size"],
            "word_embed_proj_dim": llm["hidden_size"],
            "num_hidden_layers": llm["num_hidden_layers"],
            "num_attention_heads": llm["num_attention_heads"],
            "ffn_dim": llm["opt_ffn_dim"],
            "max_position_embeddings": llm.get("max_position_embeddings", 2048),
        }
    )


def _llm_dir(kind: str, config, tokenizer_source: str, files: tuple) -> Path:
    from blip2_internlm.assets import generated, resolve_llm

    def build(out: Path) -> None:
        source = resolve_llm(tokenizer_source)
        for name in files:
            if (source / name).exists():
                shutil.copy(source / name, out / name)
        config.save_pretrained(out)

    return generated(f"bench-{kind}-{_digest(config.to_dict())}", build)


def internlm2_dir(size: dict) -> Path:
    """An InternLM2 directory: the size's config and the generated tiny InternLM2's tokenizer."""
    return _llm_dir(
        "internlm2",
        internlm2_config(size),
        "tiny",
        ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"),
    )


def opt_dir(size: dict) -> Path:
    """An OPT directory: the size's config and the generated tiny OPT's tokenizer (ids < vocab_size)."""
    return _llm_dir("opt", opt_config(size), "tiny-opt", ("vocab.json", "merges.txt", "tokenizer_config.json"))


# --- construction with random weights ---------------------------------------------------------


@contextlib.contextmanager
def lavis_opt_random_weights(dtype: torch.dtype | None = None):
    """Inside: LAVIS's vendored ``OPTForCausalLM.from_pretrained`` (which ``Blip2OPT.__init__`` calls)
    builds the same config with its own random initialisation, in eval mode as ``from_pretrained``
    leaves it, in ``dtype`` when given (else the dtype LAVIS asks for).  The rest of the baseline
    is built by the random weight source like ours (:func:`build_baseline`).
    """
    from lavis.models.blip2_models import modeling_opt

    cls = modeling_opt.OPTForCausalLM

    def from_config(path, *args, torch_dtype=None, **kwargs):
        config = cls.config_class.from_pretrained(path)
        return cls._from_config(config, torch_dtype=dtype or torch_dtype or torch.float32).eval()

    with mock.patch.object(cls, "from_pretrained", from_config):
        yield


@contextlib.contextmanager
def lavis_opt_generation():
    """LAVIS 1.0.2's vendored OPT under transformers 4.57, for the bench's duration only.

    * ``PreTrainedModel`` no longer derives from ``GenerationMixin`` (transformers >= 4.50), so
      the vendored ``OPTForCausalLM`` has no ``generate``: add the mixin, as transformers' own
      OPT does.
    * Its ``prepare_inputs_for_generation`` reads the cache from ``past=``, the keyword of the
      transformers it was written for; today's ``generate`` passes ``past_key_values=``.  Without
      the rename every step would silently recompute the whole sequence, a slowdown that is
      not LAVIS's; it is translated, the function itself runs unchanged.
    * ``Blip2OPT.generate`` repeats ``query_embeds`` per beam itself, as transformers < 4.27
      required; today's ``generate`` expands every tensor argument per beam again.  Expanded
      here: ``input_ids`` and ``attention_mask`` only, what transformers 4.26 expanded.
    """
    from lavis.models.blip2_models import modeling_opt
    from transformers import GenerationMixin

    from blip2_internlm.compat.blip2 import expand_text_inputs_for_generation

    cls = modeling_opt.OPTForCausalLM
    original_bases = cls.__bases__
    original_prepare = cls.prepare_inputs_for_generation

    def prepare_inputs_for_generation(self, input_ids=None, query_embeds=None, past_key_values=None, **kwargs):
        kwargs.pop("past", None)
        # transformers >= 4.5x hands an empty Cache object on the first step; LAVIS tests ``if past:``
        past = past_key_values
        if past is not None and hasattr(past, "get_seq_length"):
            past = past if past.get_seq_length() > 0 else None
        inputs = original_prepare(self, input_ids=input_ids, query_embeds=query_embeds, past=past, **kwargs)
        return inputs

    had_expand = "_expand_inputs_for_generation" in vars(cls)
    if GenerationMixin not in cls.__mro__:
        cls.__bases__ = original_bases + (GenerationMixin,)
    cls.prepare_inputs_for_generation = prepare_inputs_for_generation
    cls._expand_inputs_for_generation = staticmethod(expand_text_inputs_for_generation)
    try:
        yield
    finally:
        cls.prepare_inputs_for_generation = original_prepare
        if not had_expand:
            del cls._expand_inputs_for_generation
        cls.__bases__ = original_bases


def size_precision(size: dict, device: str) -> dict:
    """The size's dtypes on ``device``; ``meta`` (a shape-only build) stands for the GPU."""
    return size["precision"]["cpu" if torch.device(device).type == "cpu" else "cuda"]


def _weights(device: str) -> str:
    """Random weights on ``device``; ``meta`` (a shape-only build) has none."""
    return "meta" if torch.device(device).type == "meta" else "random"


def _model_cfg(size: dict, device: str) -> dict:
    """The model-config keys both architectures read, at ``size``."""
    precision = size_precision(size, device)
    return dict(
        load_finetuned=False,
        load_pretrained=False,
        vit_model=size["vit_model"],
        image_size=size["image_size"],
        drop_path_rate=0,
        use_grad_checkpoint=False,
        vit_precision=precision["vit"],
        freeze_vit=True,
        qformer_text_model=str(qformer_dir(size)),
        num_query_token=size["num_query_token"],
        cross_attention_freq=size["cross_attention_freq"],
        prompt="",
        max_txt_len=32,
    )


def _spell_out_of_range_ids(tokenizer) -> None:
    """Decode ids the tokenizer has no piece for as its unknown token.

    The LLMs have the size's vocabulary (e.g. 32,000 rows, for a realistic LM-head cost) but the
    generated tokenizers have ~800 pieces, and random weights pick any row; the generated texts
    are never read, they only have to decode.  Applied to both sides alike; it costs a clamp.
    """
    if not hasattr(tokenizer, "batch_decode"):
        return  # a meta build's tokenizer stand-in never decodes
    decode = tokenizer.batch_decode
    known = len(tokenizer)
    unknown = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else tokenizer.eos_token_id

    def batch_decode(sequences, *args, **kwargs):
        sequences = torch.as_tensor(sequences)
        return decode(torch.where(sequences < known, sequences, unknown), *args, **kwargs)

    tokenizer.batch_decode = batch_decode


def build_ours(size: dict, device: str, seed: int = 0, **overrides):
    """``blip2_internlm``'s InternLM2-1.8B model type at ``size`` (``blip2_internlm.factory``);
    ``overrides``: model-config keys."""
    from blip2_internlm.factory import build_model

    precision = size_precision(size, device)
    # autocast as the InternLM2 model types set it: bf16 on GPUs that have it, none on the CPU
    options = {
        **_model_cfg(size, device),
        "llm_model": str(internlm2_dir(size)),
        "llm_precision": precision["internlm2"],
        "autocast_dtype": "auto",
        **overrides,
    }
    torch.manual_seed(seed)
    model = build_model(
        "blip2_internlm",
        "pretrain_internlm2_1.8b",
        options=options,
        weights=_weights(device),
        device=device,
        is_eval=False,
    )
    _spell_out_of_range_ids(model.llm_tokenizer)
    return model


def build_baseline(size: dict, device: str, seed: int = 0, opt_dtype: str | None = None):
    """LAVIS's ``Blip2OPT`` at ``size``: its own constructor, with the ViT, Q-Former and tokenizer built
    as ours are (``blip2_internlm.models.builders``, random weights) and its vendored OPT randomly
    initialised (:func:`lavis_opt_random_weights`).

    ``opt_dtype``: build the OPT in this dtype instead of LAVIS's hard-coded fp16 (the "fair"
    variant); ``None`` is LAVIS as shipped.
    """
    from lavis.models.blip2_models.blip2_opt import Blip2OPT

    from blip2_internlm.models.builders import AssetsFromConfig, WeightSource

    class LavisBlip2OPT(AssetsFromConfig, Blip2OPT):
        """LAVIS's class, told where its BERT and ViT weights come from."""

    cfg = _model_cfg(size, device)
    weights = WeightSource(_weights(device), device)
    torch.manual_seed(seed)
    with lavis_opt_random_weights(DTYPES[opt_dtype] if opt_dtype else None), weights.building():
        model = LavisBlip2OPT(
            vit_model=cfg["vit_model"],
            img_size=cfg["image_size"],
            drop_path_rate=cfg["drop_path_rate"],
            use_grad_checkpoint=cfg["use_grad_checkpoint"],
            vit_precision=cfg["vit_precision"],
            freeze_vit=cfg["freeze_vit"],
            num_query_token=cfg["num_query_token"],
            opt_model=str(opt_dir(size)),
            prompt=cfg["prompt"],
            max_txt_len=cfg["max_txt_len"],
            qformer_text_model=cfg["qformer_text_model"],
            weights=weights,
        )
    _spell_out_of_range_ids(model.opt_tokenizer)
    if getattr(model.opt_model, "generation_config", None) is None:
        # part of lavis_opt_generation(): a class without GenerationMixin gets no generation
        # config at construction; this is the one from_pretrained would derive from its config
        from transformers import GenerationConfig

        model.opt_model.generation_config = GenerationConfig.from_model_config(model.opt_model.config)
    return model.to(device)


def lavis_eager_attention(model) -> str:
    """Keep the baseline on LAVIS's own attention code.

    ``blip2_internlm.models.attention`` (where present) routes LAVIS's EVA ViT and Q-Former
    attention classes through SDPA by default, for every model in the process; the baseline's
    modules are switched back to LAVIS's original forwards.  Its vendored OPT has only its own
    hand-written attention.
    """
    try:
        from blip2_internlm.models.attention import set_attn_implementation
    except ImportError:
        return "LAVIS's own (no SDPA switch in this checkout)"
    set_attn_implementation(model, "eager", llm=False)
    return "LAVIS's own (eager)"
