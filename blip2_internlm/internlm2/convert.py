"""Convert checkpoints between the InternLM2 layout and transformers' ``LlamaForCausalLM``.

    python -m blip2_internlm.internlm2.convert --to-llama SRC DST
    python -m blip2_internlm.internlm2.convert --from-llama SRC DST

Both models use the same (rotate-half) rotary convention, so conversion only renames
tensors, splits/merges the grouped ``wqkv`` and maps the config. Tokenizer files are
copied unchanged. Only the layout changes: no dtype cast, no rounding.

In memory, :func:`internlm2_to_llama` gives the ``LlamaForCausalLM`` of a loaded model and
:func:`internlm2_tokenizer_to_llama` a transformers ``LlamaTokenizerFast`` that encodes and
decodes as ``InternLM2Tokenizer`` does (``blip2_internlm.tools.export`` uses both).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer, LlamaTokenizerFast

from blip2_internlm.tiny.internlm2 import BUILTIN_CORPUS

from .configuration import InternLM2Config
from .modeling import InternLM2ForCausalLM
from .tokenization import InternLM2Tokenizer

TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")

# Per-layer renames that need no reshaping (InternLM2 suffix -> Llama suffix).
_LAYER_RENAMES = {
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention.wo.bias": "self_attn.o_proj.bias",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_RENAMES = {
    "model.tok_embeddings.weight": "model.embed_tokens.weight",
    "model.norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _rope_scaling_to_llama(rope_scaling: dict | None) -> dict | None:
    if not rope_scaling:
        return None
    kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
    return {"rope_type": kind, "factor": float(rope_scaling["factor"])}


def _rope_scaling_from_llama(rope_scaling: dict | None) -> dict | None:
    if not rope_scaling:
        return None
    kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
    if kind not in ("linear", "dynamic"):
        raise ValueError(f"InternLM2 supports linear or dynamic rope scaling, not {rope_scaling!r}")
    return {"type": kind, "factor": float(rope_scaling["factor"])}


def internlm2_config_to_llama(config: InternLM2Config) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings,
        initializer_range=config.initializer_range,
        rms_norm_eps=config.rms_norm_eps,
        use_cache=config.use_cache,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        tie_word_embeddings=config.tie_word_embeddings,
        rope_theta=config.rope_theta,
        rope_scaling=_rope_scaling_to_llama(config.rope_scaling),
        attention_bias=config.bias,
        mlp_bias=False,
        architectures=["LlamaForCausalLM"],
    )


def llama_config_to_internlm2(config: LlamaConfig) -> InternLM2Config:
    if getattr(config, "mlp_bias", False):
        raise ValueError("InternLM2 has no MLP bias; this Llama checkpoint uses one")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim * config.num_attention_heads != config.hidden_size:
        raise ValueError("InternLM2 needs head_dim * num_attention_heads == hidden_size")
    return InternLM2Config(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings,
        initializer_range=config.initializer_range,
        rms_norm_eps=config.rms_norm_eps,
        use_cache=config.use_cache,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        tie_word_embeddings=config.tie_word_embeddings,
        rope_theta=config.rope_theta,
        rope_scaling=_rope_scaling_from_llama(config.rope_scaling),
        bias=config.attention_bias,
        architectures=["InternLM2ForCausalLM"],
    )


def split_wqkv(wqkv: torch.Tensor, config: InternLM2Config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grouped ``wqkv`` (weight or bias, rows first) -> separate q, k, v rows."""
    groups, per_group, head_dim = (
        config.num_key_value_heads,
        config.num_attention_heads // config.num_key_value_heads,
        config.head_dim,
    )
    packed = wqkv.reshape(groups, per_group + 2, head_dim, *wqkv.shape[1:])
    q = packed[:, :per_group].reshape(groups * per_group * head_dim, *wqkv.shape[1:])
    k = packed[:, -2].reshape(groups * head_dim, *wqkv.shape[1:])
    v = packed[:, -1].reshape(groups * head_dim, *wqkv.shape[1:])
    return q.contiguous(), k.contiguous(), v.contiguous()


def merge_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: InternLM2Config) -> torch.Tensor:
    """Inverse of :func:`split_wqkv`."""
    groups, per_group, head_dim = (
        config.num_key_value_heads,
        config.num_attention_heads // config.num_key_value_heads,
        config.head_dim,
    )
    rest = q.shape[1:]
    packed = torch.cat(
        [
            q.reshape(groups, per_group, head_dim, *rest),
            k.reshape(groups, 1, head_dim, *rest),
            v.reshape(groups, 1, head_dim, *rest),
        ],
        dim=1,
    )
    return packed.reshape(groups * (per_group + 2) * head_dim, *rest).contiguous()


def internlm2_to_llama_state_dict(state_dict: dict, config: InternLM2Config) -> dict:
    out = {}
    for name, tensor in state_dict.items():
        if name in _TOP_RENAMES:
            out[_TOP_RENAMES[name]] = tensor
            continue
        prefix, _, suffix = name.partition(".layers.")
        layer, _, rest = suffix.partition(".")
        base = f"model.layers.{layer}."
        if rest in ("attention.wqkv.weight", "attention.wqkv.bias"):
            kind = rest.rsplit(".", 1)[1]
            q, k, v = split_wqkv(tensor, config)
            out[f"{base}self_attn.q_proj.{kind}"] = q
            out[f"{base}self_attn.k_proj.{kind}"] = k
            out[f"{base}self_attn.v_proj.{kind}"] = v
        elif rest in _LAYER_RENAMES:
            out[base + _LAYER_RENAMES[rest]] = tensor
        else:
            raise KeyError(f"unexpected InternLM2 tensor {name!r}")
    return out


def llama_to_internlm2_state_dict(state_dict: dict, config: InternLM2Config) -> dict:
    top = {v: k for k, v in _TOP_RENAMES.items()}
    per_layer = {v: k for k, v in _LAYER_RENAMES.items()}
    out, qkv = {}, {}
    for name, tensor in state_dict.items():
        if name in top:
            out[top[name]] = tensor
            continue
        _, _, suffix = name.partition(".layers.")
        layer, _, rest = suffix.partition(".")
        base = f"model.layers.{layer}."
        if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
            proj, kind = rest.split(".")[1:3]
            qkv.setdefault((base, kind), {})[proj] = tensor
        elif rest in per_layer:
            out[base + per_layer[rest]] = tensor
        else:
            raise KeyError(f"Llama tensor {name!r} has no InternLM2 counterpart")
    for (base, kind), parts in qkv.items():
        out[f"{base}attention.wqkv.{kind}"] = merge_wqkv(parts["q_proj"], parts["k_proj"], parts["v_proj"], config)
    return out


def _build_on_meta(model_cls, config, state_dict: dict):
    # The converted tensors become the parameters directly (no second random-initialised copy).
    with torch.device("meta"):
        model = model_cls(config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def internlm2_to_llama(model: InternLM2ForCausalLM) -> LlamaForCausalLM:
    """The same network as a ``LlamaForCausalLM``; tensors that need no reshaping are shared, not copied."""
    config = internlm2_config_to_llama(model.config)
    llama = _build_on_meta(LlamaForCausalLM, config, internlm2_to_llama_state_dict(model.state_dict(), model.config))
    llama.config.dtype = model.config.dtype
    return llama.eval()


#: Texts on which a converted tokenizer must give the original's ids and decoded strings:
#: Chinese, English, digits, runs of spaces and tabs, newlines, chat tokens, emoji (byte fallback).
TOKENIZER_PROBES = (
    *BUILTIN_CORPUS,
    "",
    " ",
    "  leading spaces",
    "a\nb\n\nc",
    "\n",
    "x  y\t\tz",
    "1234567890",
    "Hello , world !",
    "<|im_start|>user\n你好<|im_end|>\n",
    "café naïve 😀 ０１２",
)


def internlm2_tokenizer_to_llama(tokenizer: InternLM2Tokenizer, probes=TOKENIZER_PROBES) -> LlamaTokenizerFast:
    """A transformers Llama tokenizer over the same ``tokenizer.model`` that encodes and decodes as ``tokenizer``.

    ``legacy`` Llama tokenization is SentencePiece's own ``encode`` of each segment between
    special tokens, which is what ``InternLM2Tokenizer`` does; no prefix space is added or
    stripped (the official model has no dummy prefix), and ``clean_up_tokenization_spaces``
    is on because ``InternLM2Tokenizer`` always cleans up.

    Saved, it loads without protobuf: ``LlamaTokenizerFast`` rebuilds itself from the slow
    tokenizer (transformers' converter, which reads the model file with protobuf) whenever its
    ``add_prefix_space`` is set, so the fast tokenizer is converted here once and saved with
    ``add_prefix_space`` null.  Loading then reads ``tokenizer.json`` alone; the slow
    ``LlamaTokenizer`` (``use_fast=False``, needs sentencepiece) reads null as "no prefix space"
    too.  Both are checked as a user loads them, from a saved copy, on ``probes``: ids with
    special tokens added, and the text decoded with special tokens skipped.  Raises
    ``ValueError`` naming the first probe where either differs.
    """
    options = {
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "unk_token": tokenizer.unk_token,
        "pad_token": tokenizer.pad_token,
        "add_bos_token": tokenizer.add_bos_token,
        "add_eos_token": tokenizer.add_eos_token,
        "additional_special_tokens": list(tokenizer.additional_special_tokens),
        "clean_up_tokenization_spaces": True,
        "legacy": True,
        "model_max_length": tokenizer.model_max_length,
        "padding_side": tokenizer.padding_side,
        "chat_template": tokenizer.chat_template,
    }
    converted = LlamaTokenizerFast(vocab_file=tokenizer.vocab_file, from_slow=True, add_prefix_space=False, **options)
    fast = LlamaTokenizerFast(
        vocab_file=tokenizer.vocab_file, tokenizer_object=converted.backend_tokenizer, add_prefix_space=None, **options
    )
    # the slow->fast converter adds the model file's user-defined pieces (the chat tokens) as
    # ordinary tokens, so decode(skip_special_tokens=True) would keep them; mark them special
    fast.add_special_tokens({"additional_special_tokens": list(tokenizer.additional_special_tokens)})
    with tempfile.TemporaryDirectory() as tmp:
        fast.save_pretrained(tmp)
        slow = LlamaTokenizer.from_pretrained(tmp)
        (Path(tmp) / "tokenizer.model").unlink()  # a tokenizer that would need converting cannot load now
        check_tokenizer(tokenizer, (slow, LlamaTokenizerFast.from_pretrained(tmp)), probes)
    return fast


def check_tokenizer(tokenizer, converted_tokenizers, probes=TOKENIZER_PROBES) -> None:
    """Raise ``ValueError`` naming the first probe that one of ``converted_tokenizers`` encodes (special tokens
    added) or decodes (special tokens skipped) otherwise than ``tokenizer``."""
    for text in probes:
        ids = tokenizer(text).input_ids
        expected = tokenizer.decode(ids, skip_special_tokens=True)
        for converted in converted_tokenizers:
            got = converted(text).input_ids
            if got != ids:
                raise ValueError(
                    f"{type(converted).__name__} from {tokenizer.vocab_file} encodes {text!r} as {got}, "
                    f"{type(tokenizer).__name__} as {ids}"
                )
            decoded = converted.decode(ids, skip_special_tokens=True)
            if decoded != expected:
                raise ValueError(
                    f"{type(converted).__name__} from {tokenizer.vocab_file} decodes {ids} as {decoded!r}, "
                    f"{type(tokenizer).__name__} as {expected!r}"
                )


def convert_to_llama(src: str | Path, dst: str | Path) -> Path:
    src, dst = Path(src), Path(dst)
    llama = internlm2_to_llama(InternLM2ForCausalLM.from_pretrained(src, dtype="auto"))
    llama.save_pretrained(dst, safe_serialization=True)
    _copy_tokenizer(src, dst)
    return dst


def convert_from_llama(src: str | Path, dst: str | Path) -> Path:
    src, dst = Path(src), Path(dst)
    llama = LlamaForCausalLM.from_pretrained(src, dtype="auto")
    config = llama_config_to_internlm2(llama.config)
    state = llama_to_internlm2_state_dict(
        {k: v for k, v in llama.state_dict().items() if not (config.tie_word_embeddings and k == "lm_head.weight")},
        config,
    )
    model = _build_on_meta(InternLM2ForCausalLM, config, state)
    model.config.dtype = llama.config.dtype
    model.save_pretrained(dst, safe_serialization=True)
    _copy_tokenizer(src, dst)
    return dst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m blip2_internlm.internlm2.convert", description=__doc__.split("\n")[0]
    )
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--to-llama", action="store_true", help="InternLM2 checkpoint -> LlamaForCausalLM")
    direction.add_argument("--from-llama", action="store_true", help="LlamaForCausalLM checkpoint -> InternLM2")
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    args = parser.parse_args(argv)
    out = convert_to_llama(args.src, args.dst) if args.to_llama else convert_from_llama(args.src, args.dst)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
