"""A tiny OPT checkpoint directory, the baseline LLM of the InternLM2-vs-OPT comparison.

Same shape as ``facebook/opt-*`` directories (``config.json``, ``model.safetensors``,
GPT-2 byte-level BPE ``vocab.json`` + ``merges.txt``, OPT's special tokens ``<s>``=0,
``<pad>``=1, ``</s>``=2, ``<unk>``=3, ``</s>`` as BOS), at the size of the tiny InternLM2,
and pretrained on the same text, so the two tiny LLMs differ only in architecture and
tokenizer, as OPT-2.7B and InternLM2-1.8B do.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]
#: config.json of the tiny OPT, but for the vocabulary size, which is the trained BPE's.
TINY_OPT_CONFIG = dict(
    hidden_size=64,
    num_hidden_layers=2,
    ffn_dim=128,
    num_attention_heads=4,
    max_position_embeddings=512,
    word_embed_proj_dim=64,
    dropout=0.0,
    attention_dropout=0.0,
    bos_token_id=2,
    eos_token_id=2,
    pad_token_id=1,
)


def train_bpe(corpus: list[str], vocab_size: int = 800):
    """The tiny OPT's GPT-2-style byte-level BPE, trained on ``corpus``; at most ``vocab_size`` tokens."""
    from tokenizers import ByteLevelBPETokenizer

    with tempfile.TemporaryDirectory() as tmp:
        corpus_file = Path(tmp) / "corpus.txt"
        corpus_file.write_text("\n".join(corpus) + "\n", encoding="utf-8")
        bpe = ByteLevelBPETokenizer()
        bpe.train(
            [str(corpus_file)],
            vocab_size=vocab_size,
            min_frequency=1,
            special_tokens=SPECIAL_TOKENS,
            show_progress=False,
        )
    return bpe


def build_tiny_opt(out: Path, corpus: list[str], vocab_size: int = 800, seed: int = 0) -> Path:
    from transformers import OPTConfig, OPTForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bpe = train_bpe(corpus, vocab_size)
    bpe.save_model(str(out))
    vocab = json.loads((out / "vocab.json").read_text(encoding="utf-8"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "GPT2Tokenizer",
                "bos_token": "</s>",
                "eos_token": "</s>",
                "pad_token": "<pad>",
                "unk_token": "<unk>",
                "add_bos_token": True,
                "model_max_length": 512,
            }
        )
    )
    config = OPTConfig(vocab_size=len(vocab), **TINY_OPT_CONFIG)
    torch.manual_seed(seed)
    OPTForCausalLM(config).save_pretrained(out, safe_serialization=True)
    return out
