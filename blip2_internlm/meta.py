"""Build any of this project's models on the ``meta`` device: no weights, no files, no downloads.

``build_on_meta(model_cfg)`` runs the registered class's own ``from_config`` (LAVIS's stage-1
``blip2``, ``blip2_internlm``, ``blip2_opt_baseline``) inside ``torch.device("meta")`` with every
asset-touching step substituted for the duration of the call:

* ``Blip2Base.init_vision_encoder``: the same EVA ViT architecture (``vision.eva_vit``) and the
  same ``convert_weights_to_fp16`` for ``vit_precision: fp16``, but no ``eva_vit_g.pth``;
* ``Blip2Base.init_Qformer`` / ``init_tokenizer``: LAVIS's ``BertLMHeadModel`` built from a BERT
  config written here as constants (no ``from_pretrained``), and a tokenizer stub that only
  knows its length and special ids;
* ``blip2_internlm.models.blip2_internlm.load_frozen_llm``: ``AutoModelForCausalLM.from_config``
  from a config derived from ``llm_model`` (InternLM2 presets, OPT's published sizes, or a local
  directory's ``config.json``), frozen as the real loader freezes it;
* ``BaseModel.load_checkpoint_from_config``: nothing is loaded.

The result has the real module tree, parameter shapes, dtypes and ``requires_grad`` flags, which
is what ``blip2_internlm.plan`` and ``tests/test_real_size_configs.py`` need.  It cannot run a
forward pass (meta tensors have no data).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from pathlib import Path
from unittest import mock

import torch
from torch import nn

# --- Q-Former text model configs ----------------------------------------------------------

#: bert-base-uncased's config.json (huggingface.co/bert-base-uncased), written out so that no
#: download or cache is needed.  LAVIS adds a [DEC] token, so the stage-1 Q-Former's
#: vocabulary is 30522 + 1 after ``resize_token_embeddings``.
BERT_BASE_UNCASED = dict(
    vocab_size=30522,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    hidden_act="gelu",
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
    max_position_embeddings=512,
    type_vocab_size=2,
    initializer_range=0.02,
    layer_norm_eps=1e-12,
    pad_token_id=0,
)
#: bert-base-chinese: the same architecture with a 21128-token vocabulary.
BERT_BASE_CHINESE = {**BERT_BASE_UNCASED, "vocab_size": 21128}

# --- LLM configs ----------------------------------------------------------------------------

#: OPT sizes from the published config.json files (facebook/opt-*); OPT ties lm_head to the
#: input embeddings, and its vocabulary is padded to 50272.
OPT_SIZES = {
    "opt-2.7b": dict(
        hidden_size=2560, num_hidden_layers=32, num_attention_heads=32, ffn_dim=10240, word_embed_proj_dim=2560
    ),
    "opt-6.7b": dict(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, ffn_dim=16384, word_embed_proj_dim=4096
    ),
}
OPT_COMMON = dict(
    vocab_size=50272,
    max_position_embeddings=2048,
    do_layer_norm_before=True,
    dropout=0.1,
    attention_dropout=0.0,
    activation_function="relu",
    enable_bias=True,
    bos_token_id=2,
    eos_token_id=2,
    pad_token_id=1,
    tie_word_embeddings=True,
)


def _local_config_json(value) -> Path | None:
    path = Path(str(value)).expanduser()
    return path / "config.json" if (path / "config.json").is_file() else None


def qformer_bert_config(qformer_text_model):
    """LAVIS's Q-Former ``BertConfig`` for a ``qformer_text_model`` value, without reading weights."""
    from lavis.models.blip2_models.Qformer import BertConfig

    value = str(qformer_text_model)
    if value in ("tiny", "tiny-zh"):  # the generated test models (blip2_internlm.assets)
        from blip2_internlm import assets

        vocab = assets.tiny_bert_vocab() if value == "tiny" else assets.tiny_zh_vocab()
        return BertConfig(vocab_size=len(vocab), **assets.TINY_BERT_SIZES)
    local = _local_config_json(value)
    if local is not None:
        return BertConfig.from_json_file(str(local))
    if "chinese" in value.lower():
        return BertConfig(**BERT_BASE_CHINESE)
    return BertConfig(**BERT_BASE_UNCASED)


def llm_config(llm_model):
    """A transformers config for ``model.llm_model``: the architecture only, no weights.

    ``tiny`` / ``tiny-opt``: the generated test LLMs' architecture; an existing local directory: its
    ``config.json``; otherwise the name's last path component: ``internlm2-*`` (an InternLM2
    preset) or ``opt-2.7b`` / ``opt-6.7b``.
    """
    from transformers import AutoConfig, OPTConfig

    from blip2_internlm.internlm2.configuration import InternLM2Config

    value = str(llm_model)
    if value == "tiny":  # blip2_internlm.internlm2.tiny: an 800-piece SentencePiece vocabulary
        from blip2_internlm.internlm2.tiny import TINY_CONFIG

        return InternLM2Config(vocab_size=800, **TINY_CONFIG)
    if value == "tiny-opt":  # blip2_internlm.models.tiny_opt: an 800-token BPE vocabulary
        return OPTConfig(
            vocab_size=800,
            hidden_size=64,
            num_hidden_layers=2,
            ffn_dim=128,
            num_attention_heads=4,
            max_position_embeddings=512,
            word_embed_proj_dim=64,
            dropout=0.0,
            attention_dropout=0.0,
        )
    local = _local_config_json(value)
    if local is not None:
        return AutoConfig.from_pretrained(local.parent)
    name = value.rstrip("/").split("/")[-1].lower()
    if name.startswith("internlm2"):
        return InternLM2Config.preset(name)
    if name in OPT_SIZES:
        return OPTConfig(**OPT_COMMON, **OPT_SIZES[name])
    raise ValueError(
        f"model.llm_model = {value!r}: not a local checkpoint directory and not a known architecture "
        f"(internlm2-1_8b, internlm2-7b, internlm2-20b, {', '.join(OPT_SIZES)}); cannot size it without weights"
    )


# --- stand-ins for the asset-loading steps ----------------------------------------------------

_DEVICE = contextvars.ContextVar("blip2_internlm_meta_device", default="meta")


class TokenizerStub:
    """What the model constructors read from a tokenizer: its length and special ids.

    Called, it tokenizes stand-in text for memory measurements (``blip2_internlm.plan
    --measure``): every whitespace-separated word is one token with a stable id, so a caption's
    length in tokens is its length in words.  It is not a real tokenizer.
    """

    def __init__(self, length: int, bos_token_id=None, eos_token_id=None, pad_token_id=None, newline_token_id=None):
        self._length = length
        self.bos_token_id, self.eos_token_id, self.pad_token_id = bos_token_id, eos_token_id, pad_token_id
        self.newline_token_id = newline_token_id

    def __len__(self):
        return self._length

    def _word_id(self, word: str) -> int:
        import zlib

        return 5 + zlib.crc32(word.encode("utf-8")) % max(self._length - 5, 1)

    def __call__(
        self,
        text,
        padding=False,
        truncation=False,
        max_length=None,
        return_tensors=None,
        add_special_tokens=True,
        **kwargs,
    ):
        from transformers import BatchEncoding

        single = isinstance(text, str)
        rows = []
        for item in [text] if single else list(text):
            ids = [self._word_id(word) for word in item.split()]
            if add_special_tokens and self.bos_token_id is not None:
                ids = [self.bos_token_id] + ids
            if truncation and max_length:
                ids = ids[:max_length]
            rows.append(ids)
        width = max_length if padding == "max_length" and max_length else max(map(len, rows))
        pad = self.pad_token_id or 0
        masks = (
            [[1] * len(ids) + [0] * (width - len(ids)) for ids in rows] if padding else [[1] * len(ids) for ids in rows]
        )
        if padding:
            rows = [ids + [pad] * (width - len(ids)) for ids in rows]
        data = {"input_ids": rows[0] if single else rows, "attention_mask": masks[0] if single else masks}
        return BatchEncoding(data, tensor_type=return_tensors)


@contextlib.contextmanager
def _params_on(device):
    """Move every parameter and buffer to ``device`` as it is registered.

    For constructors that need real numbers while building (LAVIS's EVA ViT calls ``.item()``
    on a ``torch.linspace`` for its drop-path rates): they run on the CPU, and each tensor
    they register is replaced by one on ``device`` at once (before it is initialised), so
    nothing large is ever allocated on the CPU.
    """
    device = torch.device(device)
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def to_device_parameter(module, name, param):
        if param is not None and param.device != device:
            param = nn.Parameter(param.to(device), requires_grad=param.requires_grad)
        return register_parameter(module, name, param)

    def to_device_buffer(module, name, tensor, persistent=True):
        if tensor is not None and tensor.device != device:
            tensor = tensor.to(device)
        return register_buffer(module, name, tensor, persistent=persistent)

    with (
        mock.patch.object(nn.Module, "register_parameter", to_device_parameter),
        mock.patch.object(nn.Module, "register_buffer", to_device_buffer),
        torch.device("cpu"),
    ):
        yield


def _init_vision_encoder(cls, model_name, img_size, drop_path_rate, use_grad_checkpoint, precision):
    from lavis.models.blip2_models.blip2 import LayerNorm
    from lavis.models.eva_vit import convert_weights_to_fp16

    from blip2_internlm.models.vision import eva_vit

    with _params_on(_DEVICE.get()):
        visual_encoder = eva_vit(model_name, img_size, drop_path_rate, use_grad_checkpoint)
    if precision == "fp16":
        convert_weights_to_fp16(visual_encoder)
    return visual_encoder, LayerNorm(visual_encoder.num_features)


def _init_qformer(cls, num_query_token, vision_width, cross_attention_freq=2):
    from lavis.models.blip2_models.Qformer import BertLMHeadModel

    from blip2_internlm.compat.blip2 import current_assets

    encoder_config = qformer_bert_config(current_assets()["qformer_text_model"])
    encoder_config.encoder_width = vision_width
    encoder_config.add_cross_attention = True
    encoder_config.cross_attention_freq = cross_attention_freq
    encoder_config.query_length = num_query_token
    qformer = BertLMHeadModel(encoder_config)
    query_tokens = nn.Parameter(torch.zeros(1, num_query_token, encoder_config.hidden_size))
    query_tokens.data.normal_(mean=0.0, std=encoder_config.initializer_range)
    return qformer, query_tokens


def _init_tokenizer(cls, truncation_side="right"):
    from blip2_internlm.compat.blip2 import current_assets

    vocab = qformer_bert_config(current_assets()["qformer_text_model"]).vocab_size
    # + the [DEC] token LAVIS adds as bos_token
    return TokenizerStub(vocab + 1, bos_token_id=vocab, pad_token_id=0)


def _load_frozen_llm(llm_model, llm_precision):
    from lavis.models.blip2_models.blip2 import disabled_train
    from transformers import AutoModelForCausalLM

    from blip2_internlm.models.blip2_internlm import LLM_DTYPES

    if llm_precision not in LLM_DTYPES:
        raise ValueError(f"model.llm_precision = {llm_precision!r}; expected one of {sorted(LLM_DTYPES)}")
    config = llm_config(llm_model)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=LLM_DTYPES[llm_precision])
    for param in model.parameters():
        param.requires_grad = False
    model.eval()
    model.train = disabled_train.__get__(model)
    tokenizer = TokenizerStub(
        config.vocab_size,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id if config.pad_token_id is not None else config.eos_token_id,
        newline_token_id=-1,  # any id: only generation reads it
    )
    return tokenizer, model


def _no_checkpoint(self, cfg, **kwargs):
    return None


@contextlib.contextmanager
def meta_builders(device="meta"):
    """Inside: the BLIP-2 model constructors build on ``meta`` and read no asset.

    ``device`` other than ``meta`` builds the same model with randomly initialised weights
    there (for memory measurements).
    """
    from lavis.models.base_model import BaseModel
    from lavis.models.blip2_models.blip2 import Blip2Base

    import blip2_internlm  # noqa: F401  (compat patches + registration)
    from blip2_internlm.models import blip2_internlm as internlm_module

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(Blip2Base, "init_vision_encoder", classmethod(_init_vision_encoder)))
        stack.enter_context(mock.patch.object(Blip2Base, "init_Qformer", classmethod(_init_qformer)))
        stack.enter_context(mock.patch.object(Blip2Base, "init_tokenizer", classmethod(_init_tokenizer)))
        stack.enter_context(mock.patch.object(internlm_module, "load_frozen_llm", _load_frozen_llm))
        stack.enter_context(mock.patch.object(BaseModel, "load_checkpoint_from_config", _no_checkpoint))
        if torch.device(device).type == "meta":
            # transformers initialises added embedding rows from the old rows' mean and
            # covariance, which needs numbers; on meta there are none, so skip it
            from transformers import PreTrainedModel

            resize = PreTrainedModel.resize_token_embeddings

            def resize_without_mean(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True):
                return resize(self, new_num_tokens, pad_to_multiple_of, mean_resizing=False)

            stack.enter_context(mock.patch.object(PreTrainedModel, "resize_token_embeddings", resize_without_mean))
        token = _DEVICE.set(device)
        stack.callback(_DEVICE.reset, token)
        stack.enter_context(torch.device(device))
        yield


def build_on_meta(model_cfg, device="meta") -> nn.Module:
    """The model a LAVIS ``model:`` config describes, on ``meta``, with no weights or files.

    ``model_cfg`` is the merged model config (the model type's default YAML under the project
    config's ``model:``, as LAVIS's ``Config.build_model_config`` builds it), a DictConfig or a
    plain dict with at least ``arch``.  ``device``: see :func:`meta_builders`.
    """
    from lavis.common.registry import registry
    from omegaconf import OmegaConf

    import blip2_internlm  # noqa: F401

    if not OmegaConf.is_config(model_cfg):
        model_cfg = OmegaConf.create(dict(model_cfg))
    arch = model_cfg.get("arch")
    model_cls = registry.get_model_class(arch)
    if model_cls is None:
        raise ValueError(f"model.arch = {arch!r} is not a registered LAVIS model")
    with meta_builders(device):
        return model_cls.from_config(model_cfg)


def merged_model_config(cfg_path, options=()):
    """The model config LAVIS's ``Config`` builds from a project config plus ``--options``."""
    from lavis.common.config import Config
    from omegaconf import OmegaConf

    import blip2_internlm  # noqa: F401

    config = OmegaConf.load(os.fspath(cfg_path))
    user = OmegaConf.from_dotlist(list(options))
    model = Config.build_model_config(config, **user)
    return OmegaConf.merge(model, user).model


__all__ = [
    "build_on_meta",
    "meta_builders",
    "merged_model_config",
    "llm_config",
    "qformer_bert_config",
    "TokenizerStub",
]
