"""Offline assets: where every file LAVIS would download comes from.

Each asset is a config value.  A value is one of:

* ``tiny``: a small asset generated deterministically on first use into the cache
  directory (``$BLIP2_INTERNLM_CACHE``, default ``~/.cache/blip2_internlm``), for tests and
  the demo;
* a local path (a directory for text models, a file for weights);
* a Hugging Face hub name (``bert-base-uncased``), resolved from the local hub cache only,
  unless downloads are enabled explicitly with ``$BLIP2_INTERNLM_ALLOW_DOWNLOADS=1``.

A missing asset raises :class:`AssetMissingError` naming the config key, what was tried
and how to get the file, instead of hanging on a download.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

TINY = "tiny"
DOWNLOADS_ENV = "BLIP2_INTERNLM_ALLOW_DOWNLOADS"
CACHE_ENV = "BLIP2_INTERNLM_CACHE"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class AssetMissingError(FileNotFoundError):
    """An asset named in a config is not available locally."""

    def __init__(self, key: str, value, tried: str, how: str):
        self.key, self.value = key, value
        super().__init__(f"config key '{key}' = {value!r}: {tried}. {how}")


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "blip2_internlm")


def downloads_allowed() -> bool:
    return os.environ.get(DOWNLOADS_ENV, "0").lower() in ("1", "true", "yes")


def generated(name: str, build) -> Path:
    """``cache_dir()/name``, built by ``build(tmp_dir)`` the first time.

    Several processes (DDP ranks) may race here; each builds into its own temporary
    directory and the first rename wins.  Builders are deterministic, so the losers'
    output is identical and is discarded.
    """
    target = cache_dir() / name
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        build(tmp)
        (tmp / ".complete").write_text("ok\n")
        with contextlib.suppress(OSError):
            os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if not (target / ".complete").exists():
        raise RuntimeError(f"could not create the generated asset {target}")
    return target


def resolve_pretrained_dir(key: str, value, required_files=("config.json",), how: str = "") -> Path:
    """A local directory for a Hugging Face-style model named by config ``key``."""
    value = str(value)
    path = Path(value).expanduser()
    if path.is_dir():
        absent = [f for f in required_files if not (path / f).exists()]
        if absent:
            raise AssetMissingError(key, value, f"the directory {path} lacks {absent}", how)
        return path
    if not _HUB_ID.fullmatch(value):
        raise AssetMissingError(key, value, f"no directory at {path}", how)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(value, local_files_only=not downloads_allowed()))
    except Exception as err:  # the hub raises several error types for "not cached"
        tried = f"not a local directory and not in the Hugging Face cache ({type(err).__name__})"
        raise AssetMissingError(
            key, value, tried, how + f" Or set {DOWNLOADS_ENV}=1 on a machine with network."
        ) from None


def resolve_file(key: str, value, how: str) -> Path:
    path = Path(str(value)).expanduser()
    if not path.is_file():
        raise AssetMissingError(key, value, f"no file at {path}", how)
    return path


# --- the tiny BERT-style Q-Former text model --------------------------------------------

#: Words and characters of the synthetic shapes corpus and of short prompts, in both
#: languages, so the tiny WordPiece vocab has no [UNK] on the project's own data.
_TINY_EN_WORDS = (
    "a an the is there are of on in at to and or what which how many color colour shape "
    "it this that image picture photo question answer short yes no left right center centre "
    "middle top bottom upper lower red green blue yellow orange purple black white gray grey "
    "circle square triangle shapes one two three four 0 1 2 3 4 5 6 7 8 9 describe with"
).split()
_TINY_ZH_CHARS = (
    "一个两三四图中片里有是否什么颜色的形状圆方三角左右中间上下边红绿蓝黄橙紫黑白灰色和在这那张请描述"
    "问题简短回答多少几个形了吗呢"
)
_TINY_PUNCT = list(".,?!:;'\"()-，。？！：；、")


#: Sizes of the generated BERT-style text models (``tiny`` and ``tiny-zh``); the planner's
#: meta-device builds read them too.
TINY_BERT_SIZES = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, max_position_embeddings=128
)


def tiny_bert_vocab() -> list[str]:
    """vocab.txt of ``tiny``."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = specials + sorted(set(_TINY_EN_WORDS) | set(_TINY_ZH_CHARS) | set(_TINY_PUNCT))
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


def tiny_bert_dir() -> Path:
    return generated("tiny-bert", _build_tiny_bert)


# --- the tiny bert-base-chinese-style Q-Former text model ----------------------------------

TINY_ZH = "tiny-zh"
#: Chinese punctuation bert-base-chinese keeps as single tokens; the shapes captions join
#: several objects with "，".
_TINY_ZH_PUNCT = "，。？！：；、“”（）《》"


def tiny_zh_vocab() -> list[str]:
    """vocab.txt of ``tiny-zh`` in bert-base-chinese's layout, ids of the specials included.

    Its text is derived from the shapes generator (every colour, shape and position, both
    languages) and the prompts, so new caption words cannot fall out of it unnoticed.
    """
    from transformers.models.bert.tokenization_bert import BasicTokenizer

    from blip2_internlm.datasets import shapes
    from blip2_internlm.internlm2.pretrain_text import CAPTION_PROMPTS, VQA_PROMPTS

    text = shapes.text_corpus(tuple(shapes.PALETTE), tuple(shapes.SHAPE_NAMES_ZH), tuple(shapes.POSITION_SLOTS))
    text += [*CAPTION_PROMPTS.values(), *VQA_PROMPTS.values(), _TINY_ZH_PUNCT]
    text += [word for words in shapes.YES_NO.values() for word in words]  # the corpus answers only "yes"
    # Cased like bert-base-chinese's tokenizer, so the prompts' capitals stay whole words.
    basic = BasicTokenizer(do_lower_case=False)
    words = {w for line in text for w in basic.tokenize(line)}
    cjk = sorted(w for w in words if len(w) == 1 and basic._is_chinese_char(ord(w)))
    other = sorted(words - set(cjk) - set(_TINY_ZH_PUNCT))
    ascii_chars = [chr(c) for c in range(33, 127)]
    alnum = [c for c in ascii_chars if c.isalnum()]
    # bert-base-chinese: [PAD], [unused1..99], [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103,
    # <S>, <T>, ASCII, then single characters, words, and "##" continuation pieces last.
    vocab = ["[PAD]", *(f"[unused{i}]" for i in range(1, 100)), "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<S>", "<T>"]
    vocab += ascii_chars + list(_TINY_ZH_PUNCT) + cjk + other
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


def tiny_bert_zh_dir() -> Path:
    import hashlib

    tag = hashlib.sha256("\n".join(tiny_zh_vocab()).encode()).hexdigest()[:8]
    return generated(f"tiny-bert-zh-{tag}", _build_tiny_bert_zh)


_TEXT_MODEL_HOW = (
    "Point it at a local BERT directory (config.json, vocab.txt, weights), e.g. a copy of "
    "bert-base-uncased or bert-base-chinese fetched with `huggingface-cli download NAME "
    "--local-dir DIR`, or use 'tiny' ('tiny-zh': bert-base-chinese-style) for the generated "
    "test model."
)


def resolve_text_model(value, key: str = "model.qformer_text_model") -> Path:
    if str(value) == TINY:
        return tiny_bert_dir()
    if str(value) == TINY_ZH:
        return tiny_bert_zh_dir()
    return resolve_pretrained_dir(key, value, ("config.json", "vocab.txt"), _TEXT_MODEL_HOW)


# --- vision encoder weights ----------------------------------------------------------------

_VIT_HOW = (
    "Download LAVIS's eva_vit_g.pth (URL in the README, section 'Weights') and set "
    "model.vit_weights to its local path, or use 'tiny' with vit_model: tiny."
)


def resolve_vit_weights(vit_model: str, value, image_size: int, key: str = "model.vit_weights") -> Path:
    if str(value) == TINY:
        if vit_model != TINY:
            raise AssetMissingError(
                key, value, f"generated weights exist only for vit_model 'tiny', not {vit_model!r}", _VIT_HOW
            )
        from blip2_internlm.models.vision import build_tiny_vit_weights

        directory = generated(f"tiny-vit-{image_size}px", lambda out: build_tiny_vit_weights(out, image_size))
        return directory / "vit.safetensors"
    if value is None:
        raise AssetMissingError(key, value, f"no weights given for vit_model {vit_model!r}", _VIT_HOW)
    return resolve_file(key, value, _VIT_HOW)


# --- the frozen LLM ----------------------------------------------------------------------

_LLM_HOW = (
    "Point it at a local InternLM2 checkpoint directory (config.json, tokenizer.model, "
    "*.safetensors), e.g. internlm/internlm2-1_8b fetched with `huggingface-cli download "
    "internlm/internlm2-1_8b --local-dir DIR`, or use 'tiny' ('tiny-opt') for the generated "
    "test InternLM2 (OPT)."
)


def _pretrained_tiny_llm(build):
    """A builder for ``generated``: ``build(out, corpus)`` writes a random tiny LLM, which is
    then briefly pretrained on text, because a frozen random LLM cannot be prompted."""

    def build_and_pretrain(out: Path) -> None:
        from blip2_internlm.internlm2.pretrain_text import keyword_corpus, pretrain_causal_lm

        rows = keyword_corpus()
        build(out, [" ".join(row) for row in rows])
        losses = pretrain_causal_lm(out, rows)
        (out / "pretraining.json").write_text(json.dumps({"steps": len(losses), "losses": losses}))

    return build_and_pretrain


def _tiny_internlm2(out: Path, corpus: list) -> None:
    from blip2_internlm.internlm2 import build_tiny_internlm2

    build_tiny_internlm2(out, corpus=corpus)


def _tiny_opt(out: Path, corpus: list) -> None:
    from blip2_internlm.models.tiny_opt import build_tiny_opt

    build_tiny_opt(out, corpus=corpus)


def _corpus_tag() -> str:
    """Short digest of the pretraining text, in the asset name: new text, new asset."""
    import hashlib

    from blip2_internlm.internlm2.pretrain_text import keyword_corpus

    return hashlib.sha256(json.dumps(keyword_corpus(), ensure_ascii=False).encode()).hexdigest()[:8]


def tiny_llm_dir() -> Path:
    return generated(f"tiny-internlm2-{_corpus_tag()}", _pretrained_tiny_llm(_tiny_internlm2))


#: Generated LLM checkpoints by ``llm_model`` value.
TINY_LLMS = {
    TINY: tiny_llm_dir,
    "tiny-opt": lambda: generated(f"tiny-opt-{_corpus_tag()}", _pretrained_tiny_llm(_tiny_opt)),
}


def resolve_llm(value, key: str = "model.llm_model") -> Path:
    if str(value) in TINY_LLMS:
        return TINY_LLMS[str(value)]()
    return resolve_pretrained_dir(key, value, ("config.json",), _LLM_HOW)
