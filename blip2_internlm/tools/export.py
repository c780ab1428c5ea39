"""Export to plain transformers: ``Blip2ForConditionalGeneration`` or ``InstructBlipForConditionalGeneration``.

``blip2_internlm`` and ``blip2_opt_baseline`` become the first, ``blip2_internlm_instruct`` the second.

    python -m blip2_internlm.tools.export --to-hf OUT (--model-type T [--arch A] | --cfg-path CFG)
        [--checkpoint PTH] [--options k=v ...] [--dtype auto|fp32|fp16|bf16]

``OUT`` is a directory that transformers loads without this package, LAVIS or
``trust_remote_code``: ``Blip2ForConditionalGeneration.from_pretrained(OUT)`` and
``Blip2Processor.from_pretrained(OUT)`` (or ``AutoProcessor``), weights in safetensors; for the
instruction model ``InstructBlipForConditionalGeneration`` and ``InstructBlipProcessor`` (the
Q-Former's BERT tokenizer in ``OUT/qformer_tokenizer``).  The model class decides which.  Where it
loads, ``pip install torch transformers pillow`` is all it needs: the fast tokenizer is read from
``tokenizer.json`` alone, without protobuf or sentencepiece (``internlm2_tokenizer_to_llama``).

What maps to what (the key renames of transformers' ``convert_blip_2_original_to_pytorch.py``):

* LAVIS's EVA ViT -> ``Blip2VisionModel`` (``InstructBlipVisionModel``, the same), ``ln_vision`` as
  its ``post_layernorm``; ``q_bias`` / ``v_bias`` become the one ``qkv.bias`` (zeros for k) that
  transformers' ``Blip2Attention`` holds.  Layer scale, relative position biases, a custom
  ``qk_scale``, non-GELU MLPs and similar EVA options have no counterpart there and are refused,
  naming the block and the option.
* The Q-Former's query path -> ``Blip2QFormerModel`` (``attention.self`` -> ``attention.attention``,
  ``embeddings.LayerNorm`` -> ``layernorm``).  Its text side (word/position embeddings,
  ``intermediate`` / ``output``) is not used by BLIP-2 generation and is not exported.  The
  instruction model's Q-Former reads the instruction: all of it -> ``InstructBlipQFormerModel``, the
  text side included (``embeddings.word_embeddings`` / ``position_embeddings`` / ``layernorm``; each
  layer's ``intermediate`` / ``output`` beside ``intermediate_query`` / ``output_query``).  Both put
  the queries before the instruction's tokens and keep the first ``num_query_tokens`` outputs.
* ``query_tokens``; ``llm_proj`` -> ``language_projection``.
* InternLM2 -> ``LlamaForCausalLM`` (``blip2_internlm.internlm2.convert``); the OPT baseline's
  ``OPTForCausalLM`` is already plain transformers.  LoRA adapters (``model.llm_lora``) are merged
  into a copy of the LLM first (``models.lora.merge_lora``); the model exported keeps its own.  An
  LLM in 4 bits (QLoRA) is refused: its full-precision weights are what the export needs.

The LLM's input is ours: transformers 4.57's ``Blip2Processor`` (and ``InstructBlipProcessor``)
puts ``num_query_tokens`` ``<image>`` tokens in front of ``<s> prompt`` and the model replaces
their embeddings with the soft prompt, so a prompt reaches the LLM as ``[queries] <s> prompt``, as
in ``Blip2InternLM.generate``.  In a batch the processor pads the text before prepending the image
tokens (``[queries] [pad] <s> prompt``); with left padding, positions come from the attention
mask, so every row sees the same positions as ours (``[pad] [queries] <s> prompt``).

The instruction model's prompt is a conversation: the exported tokenizer's chat template renders it
as ``model.template`` does (``ChatTemplate.jinja``, the model's ``system_prompt`` where the history
has none), ``<s>`` included.  ``InstructBlipProcessor`` gives its one ``text`` to both tokenizers,
and our Q-Former reads the user turns joined by newlines, not the rendered history, so::

    rendered = processor.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=image, text=rendered, add_special_tokens=False, return_tensors="pt")
    instruction = "\\n".join(m["content"] for m in messages if m["role"] == "user")
    qformer = processor.qformer_tokenizer(instruction, truncation=True, return_tensors="pt")
    inputs["qformer_input_ids"], inputs["qformer_attention_mask"] = qformer.input_ids, qformer.attention_mask

(``add_special_tokens=False``: the rendered text has its ``<s>``; the Q-Former tokenizer truncates
on the left at ``max_instruction_len``, as ours.)  ``model.qformer_text_input: false`` is refused.

``<image>`` is a new token.  Where the LLM's embedding table has no free row for it (InternLM2's
is full), one zero row is appended to the input embeddings and the LM head; the exported
``generation_config.json`` suppresses it, and stops where ours stops (``model.stop_token_ids``:
end of text and the real newline token; the instruction model's end of turn and ``</s>``), with
``Blip2InternLM.generate``'s defaults (5 beams, 1 to 30 new tokens) or ``Blip2InternLMInstruct.chat``'s
(greedy, up to 128), or, with ``--cfg-path``, the run config's ``num_beams`` / ``max_len`` / ``min_len``.

One numerical difference is left: LAVIS's ``ln_vision`` uses LayerNorm's eps 1e-5 while the
EVA blocks use 1e-6, and ``Blip2VisionConfig`` has one ``layer_norm_eps`` for both; the export
keeps the blocks' value (see docs/export.md for the effect).
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from blip2_internlm.dtypes import DTYPES

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
#: LAVIS's ``BlipImageBaseProcessor`` defaults (OpenAI CLIP's mean and std).
LAVIS_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
LAVIS_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
#: Rendered by transformers' ``apply_chat_template`` and by vLLM's chat endpoint: ``<s>`` and
#: the user's text, verbatim (the model has no chat format; its prompts are plain text such as
#: "图片描述：" or "Question: ... Short answer:").  Images take no text: they go in front.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages if message['role'] == 'user' -%}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] if part['type'] == 'text' -%}{{- part['text'] -}}{%- endfor -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


class ExportError(ValueError):
    """The model (or the requested export) has no faithful plain-transformers form."""


# --- vision -----------------------------------------------------------------------------------


def vision_config_and_weights(visual_encoder: nn.Module, ln_vision: nn.LayerNorm, config_class=None):
    """Vision config and ``vision_model.*`` weights of LAVIS's EVA ViT plus ``ln_vision``.

    ``config_class``: ``Blip2VisionConfig`` (default) or ``InstructBlipVisionConfig``, whose vision
    models are the same."""
    from lavis.models.eva_vit import VisionTransformer
    from transformers import Blip2VisionConfig

    if not isinstance(visual_encoder, VisionTransformer):
        raise ExportError(
            f"the vision encoder is {type(visual_encoder).__module__}.{type(visual_encoder).__name__}; only LAVIS's "
            "EVA ViT (lavis.models.eva_vit.VisionTransformer) maps to Blip2VisionModel"
        )
    patch = visual_encoder.patch_embed
    blocks = list(visual_encoder.blocks)
    first = blocks[0].attn
    dim, heads = visual_encoder.embed_dim, first.num_heads
    head_dim = first.qkv.weight.shape[0] // (3 * heads)
    problems = []
    if patch.img_size[0] != patch.img_size[1] or patch.patch_size[0] != patch.patch_size[1]:
        problems.append(f"non-square images or patches ({patch.img_size}, {patch.patch_size})")
    if visual_encoder.pos_embed is None:
        problems.append("no absolute position embedding (use_abs_pos_emb=False)")
    if visual_encoder.rel_pos_bias is not None:
        problems.append("a shared relative position bias (use_shared_rel_pos_bias=True)")
    if head_dim * heads != dim:
        problems.append(f"attn_head_dim {head_dim} x {heads} heads != width {dim}")
    eps = blocks[0].norm1.eps
    hidden = blocks[0].mlp.fc1.out_features
    for i, block in enumerate(blocks):
        where = f"block {i}"
        if block.gamma_1 is not None or block.gamma_2 is not None:
            problems.append(f"{where}: layer scale (init_values)")
        if block.attn.relative_position_bias_table is not None:
            problems.append(f"{where}: relative position bias (use_rel_pos_bias=True)")
        if abs(block.attn.scale - head_dim**-0.5) > 1e-12 * head_dim**-0.5:
            problems.append(f"{where}: qk_scale {block.attn.scale} instead of head_dim ** -0.5")
        if {block.attn.q_bias is None, block.attn.v_bias is None} != {first.q_bias is None}:
            problems.append(f"{where}: q/v biases differ from block 0's")
        if type(block.mlp.act) is not nn.GELU or block.mlp.act.approximate != "none":
            problems.append(f"{where}: MLP activation {block.mlp.act!r} (Blip2VisionModel's is exact GELU)")
        if block.mlp.fc1.out_features != hidden:
            problems.append(f"{where}: MLP width {block.mlp.fc1.out_features} differs from block 0's {hidden}")
        for norm in (block.norm1, block.norm2):
            if not isinstance(norm, nn.LayerNorm) or norm.eps != eps:
                problems.append(f"{where}: {norm!r} (every block LayerNorm must use eps {eps})")
    if problems:
        raise ExportError("the EVA ViT cannot map to transformers' Blip2VisionModel: " + "; ".join(problems))
    if ln_vision.eps != eps:
        logger.info(
            "ln_vision eps %g becomes post_layernorm eps %g (Blip2VisionConfig has one layer_norm_eps)",
            ln_vision.eps,
            eps,
        )

    config = (config_class or Blip2VisionConfig)(
        hidden_size=dim,
        intermediate_size=hidden,
        num_hidden_layers=len(blocks),
        num_attention_heads=heads,
        image_size=patch.img_size[0],
        patch_size=patch.patch_size[0],
        hidden_act="gelu",
        layer_norm_eps=eps,
        attention_dropout=0.0,
        qkv_bias=first.q_bias is not None,
    )
    weights = {
        "embeddings.class_embedding": visual_encoder.cls_token,
        "embeddings.position_embedding": visual_encoder.pos_embed,
        "embeddings.patch_embedding.weight": patch.proj.weight,
        "embeddings.patch_embedding.bias": patch.proj.bias,
        "post_layernorm.weight": ln_vision.weight,
        "post_layernorm.bias": ln_vision.bias,
    }
    for i, block in enumerate(blocks):
        layer = f"encoder.layers.{i}."
        attn = block.attn
        weights |= {
            layer + "layer_norm1.weight": block.norm1.weight,
            layer + "layer_norm1.bias": block.norm1.bias,
            layer + "layer_norm2.weight": block.norm2.weight,
            layer + "layer_norm2.bias": block.norm2.bias,
            layer + "self_attn.qkv.weight": attn.qkv.weight,
            layer + "self_attn.projection.weight": attn.proj.weight,
            layer + "self_attn.projection.bias": attn.proj.bias,
            layer + "mlp.fc1.weight": block.mlp.fc1.weight,
            layer + "mlp.fc1.bias": block.mlp.fc1.bias,
            layer + "mlp.fc2.weight": block.mlp.fc2.weight,
            layer + "mlp.fc2.bias": block.mlp.fc2.bias,
        }
        if attn.q_bias is not None:  # EVA has no key bias: LAVIS concatenates zeros in its forward
            weights[layer + "self_attn.qkv.bias"] = torch.cat([attn.q_bias, torch.zeros_like(attn.v_bias), attn.v_bias])
    return config, {"vision_model." + name: tensor.detach() for name, tensor in weights.items()}


# --- Q-Former ---------------------------------------------------------------------------------

#: Parts of LAVIS's Q-Former that BLIP-2 generation never runs: the text side (its embeddings and
#: the feed-forward of text positions; queries have their own ``intermediate_query`` / ``output_query``).
_QFORMER_TEXT_SIDE = re.compile(
    r"embeddings\.(word_embeddings\.|position_embeddings\.)|encoder\.layer\.\d+\.(intermediate|output)\."
)


def qformer_config_and_weights(qformer_bert: nn.Module, *, instruction_aware: bool = False):
    """Q-Former config and ``qformer.*`` weights of LAVIS's Q-Former (``Qformer.bert``).

    BLIP-2: its query path as ``Blip2QFormerModel`` (``Blip2QFormerConfig``).  ``instruction_aware``:
    all of it as ``InstructBlipQFormerModel`` (``InstructBlipQFormerConfig``), whose embeddings hold
    the word and position embeddings of the instruction's tokens and the LayerNorm, and whose layers
    keep the text positions' feed-forward (``intermediate`` / ``output``) beside the queries'.
    """
    from transformers import Blip2QFormerConfig, InstructBlipQFormerConfig

    bert = qformer_bert.config
    if getattr(bert, "position_embedding_type", "absolute") != "absolute":
        raise ExportError(f"Q-Former position_embedding_type {bert.position_embedding_type!r}: only 'absolute' maps")
    if not bert.add_cross_attention:
        raise ExportError("the Q-Former has no cross-attention to the image (add_cross_attention is false)")
    if instruction_aware and qformer_bert.embeddings.word_embeddings is None:
        raise ExportError("the Q-Former has no text embeddings: it cannot read an instruction")
    sizes = dict(
        vocab_size=bert.vocab_size,
        hidden_size=bert.hidden_size,
        num_hidden_layers=bert.num_hidden_layers,
        num_attention_heads=bert.num_attention_heads,
        intermediate_size=bert.intermediate_size,
        hidden_act=bert.hidden_act,
        hidden_dropout_prob=bert.hidden_dropout_prob,
        attention_probs_dropout_prob=bert.attention_probs_dropout_prob,
        max_position_embeddings=bert.max_position_embeddings,
        initializer_range=bert.initializer_range,
        layer_norm_eps=bert.layer_norm_eps,
        pad_token_id=bert.pad_token_id,
        position_embedding_type="absolute",
        cross_attention_frequency=bert.cross_attention_freq,
        encoder_hidden_size=bert.encoder_width,
    )
    if instruction_aware:
        config = InstructBlipQFormerConfig(**sizes)
        layernorm = "embeddings.layernorm."
    else:
        config = Blip2QFormerConfig(**sizes, use_qformer_text_input=False)
        layernorm = "layernorm."
    weights = {}
    for name, tensor in qformer_bert.state_dict().items():
        if name == "embeddings.position_ids":  # a buffer transformers builds itself
            continue
        if not instruction_aware and _QFORMER_TEXT_SIDE.match(name):
            continue
        name = name.replace("embeddings.LayerNorm.", layernorm)
        name = name.replace("attention.self.", "attention.attention.")  # also crossattention.self.
        weights["qformer." + name] = tensor.detach()
    return config, weights


# --- language model and tokenizer -----------------------------------------------------------------


def plain_language_model(llm: nn.Module) -> nn.Module:
    """A transformers-native causal LM with ``llm``'s weights (a new module; ``llm`` is not changed).

    LoRA adapters (``model.llm_lora``) are merged into a copy of ``llm`` first: the export has the
    merged weights under the official names.  Quantised weights (QLoRA's 4-bit base) are refused."""
    from blip2_internlm.internlm2 import InternLM2ForCausalLM
    from blip2_internlm.internlm2.convert import internlm2_to_llama
    from blip2_internlm.models.lora import lora_layers, merge_lora

    quantization = getattr(getattr(llm, "config", None), "quantization_config", None)
    if quantization is not None:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization.quant_method
        raise ExportError(
            f"the LLM's weights are quantised ({method}, as model.llm_lora.load_in_4bit loads them): the export "
            "writes full-precision weights; build the model with load_in_4bit: false and the same checkpoint "
            "(its adapters then merge into the unquantised weights)"
        )
    if lora_layers(llm):
        llm = copy.deepcopy(llm)
        merge_lora(llm)
    if isinstance(llm, InternLM2ForCausalLM):
        return internlm2_to_llama(llm)
    if not type(llm).__module__.startswith("transformers.models."):
        raise ExportError(
            f"the LLM is {type(llm).__module__}.{type(llm).__name__}, which plain transformers cannot load; "
            "InternLM2 and transformers' own causal LMs (OPT, Llama, ...) are exported"
        )
    config = type(llm.config).from_dict(llm.config.to_dict())
    with torch.device("meta"):
        plain = type(llm)(config)
    plain.load_state_dict(llm.state_dict(), strict=True, assign=True)
    if config.tie_word_embeddings:
        plain.tie_weights()
    return plain.eval()


def plain_tokenizer(tokenizer):
    """A transformers-native tokenizer that encodes and decodes as ``tokenizer`` (a new object)."""
    from blip2_internlm.internlm2 import InternLM2Tokenizer
    from blip2_internlm.internlm2.convert import internlm2_tokenizer_to_llama

    if isinstance(tokenizer, InternLM2Tokenizer):
        return internlm2_tokenizer_to_llama(tokenizer)
    if not type(tokenizer).__module__.startswith("transformers."):
        raise ExportError(f"the tokenizer {type(tokenizer).__name__} is not a transformers tokenizer")
    with tempfile.TemporaryDirectory() as tmp:  # the processor adds <image>: never to the model's own tokenizer
        tokenizer.save_pretrained(tmp)
        return type(tokenizer).from_pretrained(tmp)


def image_processor(image_size: int, preprocess_cfg=None):
    """transformers' ``BlipImageProcessor`` equal to LAVIS's ``blip_image_eval`` (PIL bicubic resize, CLIP mean/std).

    ``preprocess_cfg`` is a model config's ``preprocess`` section; its eval processor, when given,
    must be ``blip_image_eval`` (mean and std taken from it).
    """
    from transformers import BlipImageProcessor
    from transformers.image_utils import PILImageResampling

    eval_cfg = ((preprocess_cfg or {}).get("vis_processor") or {}).get("eval") or {}
    if eval_cfg and eval_cfg.get("name") != "blip_image_eval":
        raise ExportError(
            f"preprocess.vis_processor.eval is {eval_cfg.get('name')!r}; only LAVIS's blip_image_eval has a "
            "transformers equivalent (BlipImageProcessor)"
        )
    return BlipImageProcessor(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        resample=PILImageResampling.BICUBIC,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(eval_cfg.get("mean") or LAVIS_IMAGE_MEAN),
        image_std=list(eval_cfg.get("std") or LAVIS_IMAGE_STD),
        do_convert_rgb=True,
    )


def _room_for_image_token(llm: nn.Module, image_token_id: int) -> None:
    """Give ``<image>`` an embedding row: zero rows appended to the input embeddings and the LM head."""
    rows = llm.get_input_embeddings().num_embeddings
    if image_token_id < rows:
        return
    llm.resize_token_embeddings(image_token_id + 1, mean_resizing=False)
    with torch.no_grad():  # the row is replaced by the soft prompt on input; on output it is suppressed
        llm.get_input_embeddings().weight[rows:] = 0
        llm.get_output_embeddings().weight[rows:] = 0


# --- the whole model ----------------------------------------------------------------------------

#: ``generate()``'s defaults in a BLIP-2 export: ``Blip2InternLM.generate``'s.
BLIP2_DECODING = {"num_beams": 5, "max_new_tokens": 30, "min_new_tokens": 1}


def instruction_aware(model) -> bool:
    """Whether ``model`` exports to ``InstructBlipForConditionalGeneration`` (``Blip2InternLMInstruct``) rather than
    ``Blip2ForConditionalGeneration``; an instruction model that InstructBLIP cannot hold is refused."""
    from blip2_internlm.models.blip2_internlm_instruct import Blip2InternLMInstruct

    if not isinstance(model, Blip2InternLMInstruct):
        return False
    if not model.model_config.qformer_text_input:
        raise ExportError(
            "model.qformer_text_input is false: this Q-Former reads no instruction, and InstructBLIP's always "
            "does (its processor gives every prompt to the Q-Former); nothing in transformers runs it as trained"
        )
    return True


def _transformers_classes(instruct: bool):
    """(config, model, processor, vision config) classes of the export."""
    if instruct:
        from transformers import (
            InstructBlipConfig,
            InstructBlipForConditionalGeneration,
            InstructBlipProcessor,
            InstructBlipVisionConfig,
        )

        return InstructBlipConfig, InstructBlipForConditionalGeneration, InstructBlipProcessor, InstructBlipVisionConfig
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, Blip2VisionConfig

    return Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, Blip2VisionConfig


def export_to_hf(
    model,
    out,
    *,
    processor_image=None,
    dtype: str = "auto",
    num_beams: int | None = None,
    max_new_tokens: int | None = None,
    min_new_tokens: int | None = None,
) -> Path:
    """Write ``model`` (in memory) to ``out`` for plain transformers: ``Blip2InternLM`` or the OPT baseline as
    ``Blip2ForConditionalGeneration``, ``Blip2InternLMInstruct`` as ``InstructBlipForConditionalGeneration``.

    ``processor_image``: a ``BlipImageProcessor`` (default: :func:`image_processor` at the ViT's
    size).  ``dtype``: ``auto`` (the LLM's) or one of ``fp32``, ``fp16``, ``bf16``; the Q-Former
    and query tokens stay fp32, as transformers keeps them.  ``num_beams``, ``max_new_tokens``,
    ``min_new_tokens``: what ``generate()`` does without arguments (default: ``Blip2InternLM.generate``'s,
    :data:`BLIP2_DECODING`, or ``Blip2InternLMInstruct.chat``'s: greedy, up to 128 new tokens).
    ``model`` is not changed (LoRA adapters are merged into a copy of its LLM).
    ``out`` must not exist or be empty; it is written in a temporary directory beside it and
    renamed at the end.
    """
    from transformers import GenerationConfig

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not an empty directory; remove it or choose another path")
    if dtype != "auto" and dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r}; expected auto or one of {sorted(DTYPES)}")
    instruct = instruction_aware(model)
    config_class, model_class, processor_class, vision_config_class = _transformers_classes(instruct)
    target_dtype = model.llm_model.dtype if dtype == "auto" else DTYPES[dtype]

    vision_config, weights = vision_config_and_weights(model.visual_encoder, model.ln_vision, vision_config_class)
    qformer_config, qformer_weights = qformer_config_and_weights(model.Qformer.bert, instruction_aware=instruct)
    weights |= qformer_weights
    weights["query_tokens"] = model.query_tokens.detach()
    weights["language_projection.weight"] = model.llm_proj.weight.detach()
    weights["language_projection.bias"] = model.llm_proj.bias.detach()

    tokenizer = plain_tokenizer(model.llm_tokenizer)
    tokenizer.padding_side = "left"  # generation pads on the left, as Blip2InternLM does
    # on the tokenizer: transformers 4.57's Blip2Processor drops a processor chat template when it loads
    tokenizer.chat_template = model.template.jinja(model.model_config.system_prompt) if instruct else CHAT_TEMPLATE
    num_query_tokens = model.query_tokens.shape[1]
    processor_parts = {}
    if instruct:  # the Q-Former reads the instruction as the model does: latest tokens kept
        qformer_tokenizer = plain_tokenizer(model.tokenizer)
        qformer_tokenizer.truncation_side = "left"
        qformer_tokenizer.model_max_length = model.model_config.max_instruction_len
        processor_parts["qformer_tokenizer"] = qformer_tokenizer
    processor = processor_class(
        image_processor=processor_image or image_processor(vision_config.image_size),
        tokenizer=tokenizer,
        num_query_tokens=num_query_tokens,
        **processor_parts,
    )
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    if instruct:
        from blip2_internlm.models.blip2_internlm_instruct import CHAT_DEFAULTS

        defaults = {
            "num_beams": CHAT_DEFAULTS["num_beams"],
            "max_new_tokens": CHAT_DEFAULTS["max_length"],
            "min_new_tokens": CHAT_DEFAULTS["min_length"],
        }
    else:
        defaults = BLIP2_DECODING
    requested = {"num_beams": num_beams, "max_new_tokens": max_new_tokens, "min_new_tokens": min_new_tokens}
    generation = {
        "bos_token_id": tokenizer.bos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        # the same ids: the converted tokenizer shares the vocabulary
        "eos_token_id": list(model.stop_token_ids),
        "suppress_tokens": [image_token_id],
        **{name: defaults[name] if value is None else value for name, value in requested.items()},
    }
    llm = plain_language_model(model.llm_model)
    _room_for_image_token(llm, image_token_id)
    llm.config.architectures = [type(llm).__name__]
    # transformers 4.57's Blip2ForConditionalGeneration.generate (and InstructBLIP's) calls the language
    # model's generate, whose generation config is built from text_config, not read from generation_config.json
    for name, value in generation.items():
        setattr(llm.config, name, value)
    weights |= {"language_model." + name: tensor.detach() for name, tensor in llm.state_dict().items()}

    config = config_class(
        vision_config=vision_config.to_dict(),
        qformer_config=qformer_config.to_dict(),
        text_config=llm.config.to_dict(),
        num_query_tokens=num_query_tokens,
        image_token_index=image_token_id,
    )
    config.architectures = [model_class.__name__]
    with torch.device("meta"):
        hf = model_class(config)
    hf.load_state_dict(weights, strict=True, assign=True)
    hf.tie_weights()
    hf.to(target_dtype)
    hf.qformer.float()
    hf.query_tokens.data = hf.query_tokens.data.float()
    # from_pretrained(dtype="auto") reads each sub-config's dtype
    for sub_config in (hf.config, hf.config.vision_config, hf.config.text_config):
        sub_config.dtype = target_dtype
    hf.config.qformer_config.dtype = torch.float32
    hf.generation_config = GenerationConfig(**generation)  # what GenerationConfig.from_pretrained and vLLM read

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        hf.save_pretrained(staging, safe_serialization=True)
        # save_pretrained records the first parameter's dtype (the fp32 query tokens) as the model's;
        # from_pretrained(dtype="auto") would then load the language projection in fp32
        hf.config.dtype = target_dtype
        hf.config.save_pretrained(staging)
        processor.save_pretrained(staging)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(staging, out)
        _readable_by_all(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out


def _readable_by_all(directory: Path) -> None:
    """mkdtemp makes the directory private, and the weights file comes out 0600; give all the umask's modes."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():  # files, and InstructBLIP's qformer_tokenizer/
        if path.is_dir():
            _readable_by_all(path)
        else:
            path.chmod(0o666 & ~umask)


# --- command line -------------------------------------------------------------------------------


def run_decoding(cfg_path: Path | None, options: Sequence[str]) -> dict:
    """``export_to_hf``'s generation defaults from a run config's ``run.num_beams`` / ``max_len`` / ``min_len``
    (what LAVIS's caption task decodes with), so the export decodes as the evaluation that scored it."""
    from omegaconf import OmegaConf

    run = (
        OmegaConf.merge(
            OmegaConf.load(cfg_path) if cfg_path is not None else {}, OmegaConf.from_dotlist(list(options))
        ).get("run")
        or {}
    )
    names = {"num_beams": "num_beams", "max_len": "max_new_tokens", "min_len": "min_new_tokens"}
    return {names[key]: int(run[key]) for key in names if run.get(key) is not None}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m blip2_internlm.tools.export", description=__doc__.split("\n")[0])
    parser.add_argument("--to-hf", type=Path, required=True, metavar="OUT", help="directory to write")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-type", help="a model type of --arch (tiny, pretrain_internlm2_1.8b, ...)")
    source.add_argument("--cfg-path", type=Path, help="a LAVIS config with a model: section (arch, model_type, ...)")
    parser.add_argument(
        "--arch",
        default="blip2_internlm",
        help="with --model-type: blip2_internlm (default), blip2_opt_baseline or blip2_internlm_instruct",
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="stage-2 or instruction-tuned checkpoint (.pth or .safetensors): every trainable weight",
    )
    parser.add_argument(
        "--options", nargs="+", default=[], help="config overrides, key=value (model.llm_model=/path/to/internlm2 ...)"
    )
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="weights dtype (auto: the LLM's)")
    args = parser.parse_args(argv)

    import blip2_internlm  # noqa: F401  (LAVIS with this package's fixes and registrations)
    from blip2_internlm.assets import AssetMissingError
    from blip2_internlm.checkpoint import CheckpointError
    from blip2_internlm.factory import ModelBuildError, merged_model_config, parse_model_options

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.checkpoint is not None and not args.checkpoint.is_file():
        parser.error(f"--checkpoint {args.checkpoint}: no such file")
    try:
        arch = args.arch if args.cfg_path is None else None  # a config names its own
        options = parse_model_options(args.options, run_sections=True)
        config = merged_model_config(arch, args.model_type, cfg_path=args.cfg_path, options=options)
        decoding = run_decoding(args.cfg_path, args.options)
        model = config.build(checkpoint=args.checkpoint)
        vit_size = model.visual_encoder.patch_embed.img_size[0]
        out = export_to_hf(
            model,
            args.to_hf,
            dtype=args.dtype,
            processor_image=image_processor(vit_size, config.preprocess),
            **decoding,
        )
    except (ExportError, ModelBuildError, AssetMissingError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    if decoding:
        print(f"generate() defaults from the run config: {decoding}")
    if model.prompt and instruction_aware(model):
        print(f"the model's default instruction is {model.prompt!r}: send it as the user's message")
    elif model.prompt:
        print(f"the model's default prompt is {model.prompt!r}: pass it as the processor's text")
    return 0


if __name__ == "__main__":
    sys.exit(main())
