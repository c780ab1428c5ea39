"""Architectures from names, without weights: the Q-Former's BERT config and the LLM's config for a
``model:`` value, and a tokenizer stand-in that knows only its length and special ids.

The ``random`` and ``meta`` weight sources (``blip2_internlm.models.builders``) build from these:
a local directory's ``config.json`` when the value is one, else the published sizes written out
here, so that no download or cache is needed.
"""

from __future__ import annotations

from pathlib import Path

from blip2_internlm import assets

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
    generated = assets.generated_config(assets.TEXT_MODEL, value)  # the tiny test models, known without building
    if generated is not None:
        return BertConfig(**{k: v for k, v in generated.items() if k != "model_type"})
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
    generated = assets.generated_config(assets.LLM, value)  # the tiny test LLMs, known without building
    if generated is not None:
        return AutoConfig.for_model(**generated)
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


class TokenizerStub:
    """What the model constructors read from a tokenizer: its length and special ids.

    Called, it tokenizes stand-in text for memory measurements (``blip2_internlm.tools.plan
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
