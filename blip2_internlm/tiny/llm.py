"""The tiny frozen LLMs, ``tiny`` (InternLM2) and ``tiny-opt`` (OPT): random tiny checkpoints,
briefly pretrained on text, because a frozen random LLM cannot be prompted."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from blip2_internlm.assets import GeneratedAsset
from blip2_internlm.tiny.internlm2 import TINY_CONFIG, build_tiny_internlm2
from blip2_internlm.tiny.opt import TINY_OPT_CONFIG, build_tiny_opt, train_bpe
from blip2_internlm.tiny.pretrain_text import keyword_corpus, pretrain_causal_lm

#: the tokenizers' size; SentencePiece gives exactly this many pieces, the BPE at most this many
VOCAB_SIZE = 800


def _tokenizer_corpus() -> list[str]:
    return [" ".join(row) for row in keyword_corpus()]


def corpus_tag() -> str:
    """Short digest of the pretraining text, in the asset name: new text, new asset."""
    return hashlib.sha256(json.dumps(keyword_corpus(), ensure_ascii=False).encode()).hexdigest()[:8]


def pretrained(build):
    """A builder for ``assets.generated``: ``build(out, corpus)`` writes a random tiny LLM with a
    tokenizer trained on the corpus, which is then pretrained on the same text."""

    def build_and_pretrain(out: Path) -> None:
        rows = keyword_corpus()
        build(out, [" ".join(row) for row in rows])
        losses = pretrain_causal_lm(out, rows)
        (out / "pretraining.json").write_text(json.dumps({"steps": len(losses), "losses": losses}))

    return build_and_pretrain


TINY_INTERNLM2 = GeneratedAsset(
    dirname=lambda: f"tiny-internlm2-{corpus_tag()}",
    build=pretrained(lambda out, corpus: build_tiny_internlm2(out, corpus=corpus, vocab_size=VOCAB_SIZE)),
    config=lambda: {"model_type": "internlm2", "vocab_size": VOCAB_SIZE, **TINY_CONFIG},
)
TINY_OPT = GeneratedAsset(
    dirname=lambda: f"tiny-opt-{corpus_tag()}",
    build=pretrained(lambda out, corpus: build_tiny_opt(out, corpus=corpus, vocab_size=VOCAB_SIZE)),
    config=lambda: {
        "model_type": "opt",
        "vocab_size": train_bpe(_tokenizer_corpus(), VOCAB_SIZE).get_vocab_size(),
        **TINY_OPT_CONFIG,
    },
)
