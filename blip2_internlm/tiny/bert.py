"""The tiny BERT-style Q-Former text models: ``tiny`` (bert-base-uncased-style) and ``tiny-zh``
(bert-base-chinese-style), with vocabularies that cover the project's own text."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from blip2_internlm.assets import GeneratedAsset

#: Words and characters of the synthetic shapes corpus and of short prompts, in both
#: languages, so the tiny WordPiece vocab has no [UNK] on the project's own data.
_EN_WORDS = (
    "a an the is there are of on in at to and or what which how many color colour shape "
    "it this that image picture photo question answer short yes no left right center centre "
    "middle top bottom upper lower red green blue yellow orange purple black white gray grey "
    "circle square triangle shapes one two three four 0 1 2 3 4 5 6 7 8 9 describe with"
).split()
_ZH_CHARS = (
    "一个两三四图中片里有是否什么颜色的形状圆方三角左右中间上下边红绿蓝黄橙紫黑白灰色和在这那张请描述"
    "问题简短回答多少几个形了吗呢"
)
_PUNCT = list(".,?!:;'\"()-，。？！：；、")

#: Sizes of both generated BERT-style text models.
TINY_BERT_SIZES = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, max_position_embeddings=128
)


def tiny_bert_vocab() -> list[str]:
    """vocab.txt of ``tiny``."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = specials + sorted(set(_EN_WORDS) | set(_ZH_CHARS) | set(_PUNCT))
    vocab += [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    vocab += list("abcdefghijklmnopqrstuvwxyz")
    return list(dict.fromkeys(vocab))


def _build_tiny_bert(out: Path) -> None:
    import torch
    from transformers import BertConfig, BertModel

    vocab = tiny_bert_vocab()
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    config = BertConfig(vocab_size=len(vocab), **TINY_BERT_SIZES)
    torch.manual_seed(0)
    BertModel(config, add_pooling_layer=False).save_pretrained(out, safe_serialization=True)
    (out / "tokenizer_config.json").write_text(
        json.dumps({"do_lower_case": True, "model_max_length": 128, "tokenizer_class": "BertTokenizer"})
    )


#: Chinese punctuation bert-base-chinese keeps as single tokens; the shapes captions join
#: several objects with "，".
_ZH_PUNCT = "，。？！：；、“”（）《》"


def tiny_zh_vocab() -> list[str]:
    """vocab.txt of ``tiny-zh`` in bert-base-chinese's layout, ids of the specials included.

    Its text is derived from the shapes generator (every colour, shape and position, both
    languages) and the prompts, so new caption words cannot fall out of it unnoticed.
    """
    from transformers.models.bert.tokenization_bert import BasicTokenizer

    from blip2_internlm.datasets import shapes
    from blip2_internlm.tiny.pretrain_text import CAPTION_PROMPTS, VQA_PROMPTS

    text = shapes.text_corpus(tuple(shapes.PALETTE), tuple(shapes.SHAPE_NAMES_ZH), tuple(shapes.POSITION_SLOTS))
    text += [*CAPTION_PROMPTS.values(), *VQA_PROMPTS.values(), _ZH_PUNCT]
    text += [word for words in shapes.YES_NO.values() for word in words]  # the corpus answers only "yes"
    # Cased like bert-base-chinese's tokenizer, so the prompts' capitals stay whole words.
    basic = BasicTokenizer(do_lower_case=False)
    words = {w for line in text for w in basic.tokenize(line)}
    cjk = sorted(w for w in words if len(w) == 1 and basic._is_chinese_char(ord(w)))
    other = sorted(words - set(cjk) - set(_ZH_PUNCT))
    ascii_chars = [chr(c) for c in range(33, 127)]
    alnum = [c for c in ascii_chars if c.isalnum()]
    # bert-base-chinese: [PAD], [unused1..99], [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103,
    # <S>, <T>, ASCII, then single characters, words, and "##" continuation pieces last.
    vocab = ["[PAD]", *(f"[unused{i}]" for i in range(1, 100)), "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<S>", "<T>"]
    vocab += ascii_chars + list(_ZH_PUNCT) + cjk + other
    vocab += [f"##{c}" for c in alnum] + [f"##{c}" for c in cjk]
    return list(dict.fromkeys(vocab))


def _build_tiny_bert_zh(out: Path) -> None:
    import torch
    from transformers import BertConfig, BertForMaskedLM

    vocab = tiny_zh_vocab()
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    # architectures: what bert-base-chinese's config.json names
    config = BertConfig(vocab_size=len(vocab), architectures=["BertForMaskedLM"], **TINY_BERT_SIZES)
    torch.manual_seed(0)
    model = BertForMaskedLM(config)
    with torch.no_grad():  # a pretrained head's bias is not zero; make loading it observable
        model.cls.predictions.bias.normal_(0.0, 0.02)
    model.save_pretrained(out, safe_serialization=True)
    # bert-base-chinese's tokenizer_config.json is {"do_lower_case": false}
    # (https://huggingface.co/google-bert/bert-base-chinese/blob/main/tokenizer_config.json);
    # tokenize_chinese_chars is BertTokenizer's default there, spelled out here.
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "do_lower_case": False,
                "tokenize_chinese_chars": True,
                "model_max_length": 128,
                "tokenizer_class": "BertTokenizer",
            }
        )
    )


def _named_by_vocab(prefix: str, vocab: list[str]) -> str:
    # a changed vocabulary (the Chinese one follows the shapes text) is a new asset, never a stale cached one
    digest = hashlib.sha256("\n".join(vocab).encode()).hexdigest()
    return f"{prefix}-{digest[:8]}"


TINY_BERT = GeneratedAsset(
    dirname=lambda: _named_by_vocab("tiny-bert", tiny_bert_vocab()),
    build=_build_tiny_bert,
    config=lambda: {"model_type": "bert", "vocab_size": len(tiny_bert_vocab()), **TINY_BERT_SIZES},
)
TINY_BERT_ZH = GeneratedAsset(
    dirname=lambda: _named_by_vocab("tiny-bert-zh", tiny_zh_vocab()),
    build=_build_tiny_bert_zh,
    config=lambda: {"model_type": "bert", "vocab_size": len(tiny_zh_vocab()), **TINY_BERT_SIZES},
)
