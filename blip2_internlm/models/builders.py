"""The parts of a BLIP-2 model, built from explicit arguments and a weight source.

Every model this package builds (stage 1, ``blip2_internlm``, the OPT baseline, and through them
the ``meta`` builds of the planner and the bench's random-weight models) gets its ViT, Q-Former,
tokenizer and frozen LLM from the functions here, with the config values passed in and a
:class:`WeightSource` saying where the numbers come from:

* ``files``: the weights the config values name (``blip2_internlm.assets`` turns a value into a
  local path; ``tiny`` names the generated test assets);
* ``random``: the same architecture, each module's own random initialisation, on ``device``; the
  tokenizers are read from files where the value names local ones, else stand-ins;
* ``meta``: the same architecture on the ``meta`` device (shapes, dtypes, ``requires_grad``; no
  data), tokenizer stand-ins; nothing is read.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from unittest import mock

import torch
from torch import nn

from blip2_internlm.assets import AssetMissingError, resolve_llm, resolve_text_model, resolve_vit_weights
from blip2_internlm.dtypes import to_dtype
from blip2_internlm.hardware import resolve_llm_precision, target_device
from blip2_internlm.models.architectures import TokenizerStub, llm_config, qformer_bert_config

WEIGHT_KINDS = ("files", "random", "meta")


@dataclass(frozen=True)
class WeightSource:
    """Where a model's numbers come from: ``files`` (default), ``random`` (on ``device``) or ``meta``."""

    kind: str = "files"
    device: str | None = None

    def __post_init__(self):
        if self.kind not in WEIGHT_KINDS:
            raise ValueError(f"weight source {self.kind!r}; expected one of {list(WEIGHT_KINDS)}")
        if self.kind == "meta" and self.device not in (None, "meta"):
            raise ValueError(f"a meta weight source builds on meta, not {self.device!r}")

    @property
    def loads_files(self) -> bool:
        return self.kind == "files"

    @property
    def target_device(self) -> torch.device:
        if self.kind == "meta":
            return torch.device("meta")
        return torch.device(self.device or "cpu")

    @contextlib.contextmanager
    def building(self):
        """The device context the modules of a model are created in (files: the CPU, as LAVIS builds)."""
        if self.loads_files:
            yield
            return
        with torch.device(self.target_device), _resize_without_mean_on_meta(self.kind == "meta"):
            yield


FILES = WeightSource()


@contextlib.contextmanager
def _resize_without_mean_on_meta(on_meta: bool):
    """transformers initialises added embedding rows from the old rows' mean and covariance, which needs numbers;
    on meta there are none (LAVIS's stage 1 resizes the Q-Former's embeddings for its [DEC] token)."""
    if not on_meta:
        yield
        return
    from transformers import PreTrainedModel

    resize = PreTrainedModel.resize_token_embeddings

    def resize_without_mean(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True):
        return resize(self, new_num_tokens, pad_to_multiple_of, mean_resizing=False)

    with mock.patch.object(PreTrainedModel, "resize_token_embeddings", resize_without_mean):
        yield


@contextlib.contextmanager
def parameters_on(device):
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


def build_vision_encoder(
    vit_model, img_size, drop_path_rate, use_grad_checkpoint, precision, vit_weights, weights: WeightSource = FILES
):
    """LAVIS's ``(visual_encoder, ln_vision)`` pair: the EVA ViT named by ``vit_model`` and a LayerNorm."""
    from lavis.models.blip2_models.blip2 import LayerNorm
    from lavis.models.eva_vit import convert_weights_to_fp16

    from blip2_internlm.models.vision import eva_vit, load_vit_weights

    if weights.loads_files:
        path = resolve_vit_weights(vit_model, vit_weights, img_size)  # before building: a missing file fails fast
        visual_encoder = eva_vit(vit_model, img_size, drop_path_rate, use_grad_checkpoint)
        load_vit_weights(visual_encoder, path)
    else:
        with parameters_on(weights.target_device):
            visual_encoder = eva_vit(vit_model, img_size, drop_path_rate, use_grad_checkpoint)
    if precision == "fp16":
        convert_weights_to_fp16(visual_encoder)
    with weights.building():
        ln_vision = LayerNorm(visual_encoder.num_features)
    return visual_encoder, ln_vision


def build_qformer(
    text_model,
    num_query_token,
    vision_width,
    cross_attention_freq=2,
    weights: WeightSource = FILES,
    vocab_size: int | None = None,
):
    """LAVIS's Q-Former (``BertLMHeadModel`` with cross-attention every ``cross_attention_freq`` layers) and its
    query tokens.  From files it starts from ``text_model``'s BERT weights, as LAVIS's ``init_Qformer`` does;
    ``vocab_size`` sizes the embeddings of a random or meta build (stage 1 adds a [DEC] token)."""
    from lavis.models.blip2_models.Qformer import BertConfig, BertLMHeadModel

    if weights.loads_files:
        path = resolve_text_model(text_model)
        config = BertConfig.from_pretrained(path)
    else:
        config = qformer_bert_config(text_model)
        if vocab_size is not None:
            config.vocab_size = vocab_size
    config.encoder_width = vision_width
    config.add_cross_attention = True
    config.cross_attention_freq = cross_attention_freq
    config.query_length = num_query_token
    with weights.building():
        if weights.loads_files:
            qformer = BertLMHeadModel.from_pretrained(path, config=config)
        else:
            qformer = BertLMHeadModel(config)
        query_tokens = nn.Parameter(torch.zeros(1, num_query_token, config.hidden_size))
    query_tokens.data.normal_(mean=0.0, std=config.initializer_range)
    return qformer, query_tokens


def build_qformer_tokenizer(text_model, truncation_side="right", weights: WeightSource = FILES):
    """``text_model``'s BERT tokenizer with LAVIS's ``[DEC]`` as bos token (a stand-in on meta, and for random
    weights when ``text_model`` names no local files)."""
    from transformers import BertTokenizer

    if weights.loads_files:
        path = resolve_text_model(text_model)
    else:
        path = None if weights.kind == "meta" else _local_or_none(resolve_text_model, text_model)
    if path is None:
        vocab = qformer_bert_config(text_model).vocab_size
        return TokenizerStub(vocab + 1, bos_token_id=vocab, pad_token_id=0)  # + the [DEC] token
    tokenizer = BertTokenizer.from_pretrained(path, truncation_side=truncation_side)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    return tokenizer


def load_frozen_llm(
    llm_model,
    llm_precision: str,
    attn_implementation: str = "sdpa",
    weights: WeightSource = FILES,
    load_in_4bit: bool = False,
):
    """Tokenizer and frozen causal LM for ``model.llm_model`` (a local checkpoint directory, or ``tiny``);
    ``llm_precision: auto`` resolves for the device the model will run on (``blip2_internlm.hardware``).
    ``load_in_4bit``: the weights read from files are quantised to 4-bit NF4 by bitsandbytes on the CUDA
    device (QLoRA's base model); a random or meta build keeps ``llm_precision`` (the planner's upper bound)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = target_device() if weights.loads_files else weights.target_device
    dtype = to_dtype(resolve_llm_precision(llm_precision, device), "model.llm_precision")
    if weights.loads_files:
        quantized = four_bit_loading(device, dtype) if load_in_4bit else {}
        path = resolve_llm(llm_model)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(
            path, torch_dtype=dtype, low_cpu_mem_usage=True, attn_implementation=attn_implementation, **quantized
        )
    else:
        config = llm_config(llm_model)
        with weights.building():
            model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
        path = None if weights.kind == "meta" else _local_or_none(resolve_llm, llm_model)
        tokenizer = AutoTokenizer.from_pretrained(path) if path is not None else _llm_tokenizer_stub(config)
    return tokenizer, freeze(model)


def four_bit_loading(device: torch.device, compute_dtype: torch.dtype) -> dict:
    """``from_pretrained`` arguments for QLoRA's 4-bit base weights (NF4, double quantisation), placed on ``device``;
    a clear error where they cannot run (not CUDA, no bitsandbytes)."""
    if device.type != "cuda":
        raise ValueError(
            f"model.llm_lora.load_in_4bit: bitsandbytes' 4-bit weights run on CUDA, and this model is built for "
            f"{device}; set load_in_4bit: false"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ValueError("model.llm_lora.load_in_4bit needs bitsandbytes: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    return {"quantization_config": config, "device_map": {"": device.index or 0}}


def freeze(model: nn.Module) -> nn.Module:
    """No gradients, eval mode, and ``train()`` that keeps it so (LAVIS's ``disabled_train``)."""
    from lavis.models.blip2_models.blip2 import disabled_train

    for param in model.parameters():
        param.requires_grad = False
    model.eval()
    model.train = disabled_train.__get__(model)
    return model


#: Any of these in a directory: its tokenizer is read (random weights); otherwise a stand-in is used.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "vocab.txt", "vocab.json")


def _local_or_none(resolve, value):
    """The local directory ``value`` names if it holds a tokenizer, else None (no error: random weights need none)."""
    try:
        path = resolve(value)
    except AssetMissingError:
        return None
    return path if any((path / name).is_file() for name in TOKENIZER_FILES) else None


def _llm_tokenizer_stub(config) -> TokenizerStub:
    return TokenizerStub(
        config.vocab_size,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id if config.pad_token_id is not None else config.eos_token_id,
        newline_token_id=-1,  # any id: only generation reads it
    )


class AssetsFromConfig:
    """For LAVIS's own BLIP-2 classes: their constructors call ``self.init_tokenizer()``,
    ``self.init_vision_encoder(...)`` and ``self.init_Qformer(...)`` with no word on where the weights
    are.  A subclass mixing this in takes them as constructor arguments (``qformer_text_model``,
    ``vit_weights``, ``weights``) and builds through this module."""

    def __init__(self, *args, qformer_text_model="bert-base-uncased", vit_weights=None, weights=FILES, **kwargs):
        # plain attributes, set before nn.Module.__init__ runs: LAVIS's __init__ calls the builders below
        object.__setattr__(self, "_assets", (str(qformer_text_model), vit_weights, weights))
        super().__init__(*args, **kwargs)

    def init_tokenizer(self, truncation_side="right"):
        text_model, _, weights = self._assets
        return build_qformer_tokenizer(text_model, truncation_side, weights)

    def init_vision_encoder(self, model_name, img_size, drop_path_rate, use_grad_checkpoint, precision):
        _, vit_weights, weights = self._assets
        return build_vision_encoder(
            model_name, img_size, drop_path_rate, use_grad_checkpoint, precision, vit_weights, weights
        )

    def init_Qformer(self, num_query_token, vision_width, cross_attention_freq=2):  # noqa: N802 (LAVIS's name)
        text_model, _, weights = self._assets
        vocab_size = None if weights.loads_files else len(self.tokenizer)
        return build_qformer(text_model, num_query_token, vision_width, cross_attention_freq, weights, vocab_size)
