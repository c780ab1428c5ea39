"""Text processors for Chinese captions and questions: ``chinese_caption``, ``chinese_question``.

LAVIS's ``blip_caption`` lowercases, deletes ``.!":;`` and truncates by space-separated
words, which for Chinese (no spaces, full-width punctuation) truncates nothing and mangles
punctuation.  These processors instead:

1. fold compatibility forms (NFKC, around the kept punctuation) so full-width ASCII letters,
   digits, symbols and the ideographic space become half-width, while the Chinese
   punctuation in :data:`CHINESE_PUNCT` stays as it is (NFKC would turn ``，`` into ``,``);
2. turn a half-width ``, . ? ! : ;`` that directly follows a CJK character (or Chinese
   punctuation) into its full-width form; ``3.5`` or ``OK,`` are left alone, as is a run of
   two or more dots (an ASCII ellipsis);
3. collapse whitespace runs to one space and delete spaces whose neighbours on both sides
   are CJK characters or Chinese punctuation: COCO-CN and Flickr8k-CN ship word-segmented
   text (``一个 男人 在 骑 自行车 。``), and a tokenizer would otherwise see those spaces.
   A space next to a Latin word or a number is kept (``穿着 NBA 球衣``);
4. optionally lowercase ASCII (``lowercase: true``; Chinese has no case);
5. truncate to ``max_chars`` characters, or to the longest prefix that the tokenizer
   encodes in at most ``max_tokens`` tokens (never both), so the result is always a
   prefix of the normalised text and never cuts a multi-byte character in half;
6. prepend ``prompt`` (``chinese_caption`` only), which is not normalised or counted.
"""

from __future__ import annotations

import re
import unicodedata

from lavis.common.registry import registry
from lavis.processors.base_processor import BaseProcessor
from omegaconf import OmegaConf

# Full-width punctuation that Chinese text uses as such; everything else in the
# full-width block (U+FF01..U+FF5E) is folded to ASCII.
CHINESE_PUNCT = "，。！？：；、“”‘’（）《》〈〉【】「」『』〔〕…—～·"
_HALF_TO_FULL = {",": "，", ".": "。", "?": "？", "!": "！", ":": "：", ";": "；"}

_CJK = (
    "\u2e80-\u2fdf"  # radicals
    "\u3040-\u30ff"  # kana (Japanese in mixed corpora)
    "\u3400-\u4dbf"  # CJK extension A
    "\u4e00-\u9fff"  # CJK unified ideographs
    "\uf900-\ufaff"  # compatibility ideographs (NFKC maps most to the unified ones)
    "\U00020000-\U0003134f"  # extensions B..G
)
_CJK_OR_PUNCT = _CJK + re.escape(CHINESE_PUNCT)
_HALF_PUNCT_AFTER_CJK = re.compile(rf"(?<=[{_CJK_OR_PUNCT}]) ?([,?!:;]|\.(?!\.))")
_SPACE_BETWEEN_CJK = re.compile(rf"(?<=[{_CJK_OR_PUNCT}]) (?=[{_CJK_OR_PUNCT}])")
_WHITESPACE = re.compile(r"\s+")


_KEPT = re.compile(f"([{re.escape(CHINESE_PUNCT)}])")


def _fold(text: str) -> str:
    # NFKC between the kept marks only; the split keeps them as odd-indexed pieces.
    pieces = _KEPT.split(text)
    return "".join(p if i % 2 else unicodedata.normalize("NFKC", p) for i, p in enumerate(pieces))


def normalize_chinese(text: str, lowercase: bool = False) -> str:
    """Steps 1-4 of the module docstring."""
    if not isinstance(text, str):
        raise TypeError(f"expected a caption string, got {type(text).__name__}: {text!r}")
    text = _fold(text)
    text = _WHITESPACE.sub(" ", text).strip()
    # Repeated: a converted mark is Chinese punctuation, so "好?!" becomes "好？！".
    while True:
        converted = _HALF_PUNCT_AFTER_CJK.sub(lambda m: _HALF_TO_FULL[m.group(1)], text)
        if converted == text:
            break
        text = converted
    text = _SPACE_BETWEEN_CJK.sub("", text)
    if lowercase:
        text = "".join(c.lower() if c.isascii() else c for c in text)
    return text


class _Truncation:
    """``max_chars`` or ``max_tokens`` (with ``tokenizer``); neither means no truncation."""

    def __init__(self, max_chars=None, max_tokens=None, tokenizer=None):
        if max_chars is not None and max_tokens is not None:
            raise ValueError("chinese text processor: set max_chars or max_tokens, not both")
        if max_tokens is not None and tokenizer is None:
            raise ValueError("chinese text processor: max_tokens needs 'tokenizer' (a tokenizer directory or 'tiny')")
        for key, value in (("max_chars", max_chars), ("max_tokens", max_tokens)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"chinese text processor: {key} must be a positive integer or null, got {value!r}")
        self.max_chars, self.max_tokens = max_chars, max_tokens
        self.tokenizer = _load_tokenizer(tokenizer) if max_tokens is not None else None

    def n_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def __call__(self, text: str) -> str:
        if self.max_chars is not None:
            return text[: self.max_chars].rstrip()
        if self.max_tokens is None or self.n_tokens(text) <= self.max_tokens:
            return text
        # Longest prefix within budget, by bisection on characters: decoding the first
        # max_tokens ids could split a byte-fallback character or respace the text.
        lo, hi = 0, len(text)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.n_tokens(text[:mid]) <= self.max_tokens:
                lo = mid
            else:
                hi = mid - 1
        return text[:lo].rstrip()


def _load_tokenizer(name):
    from transformers import AutoTokenizer

    from blip2_internlm.assets import resolve_llm

    return AutoTokenizer.from_pretrained(str(resolve_llm(name, key="text_processor.tokenizer")))


def _options(cfg) -> dict:
    cfg = OmegaConf.create() if cfg is None else cfg
    return {
        "lowercase": bool(cfg.get("lowercase", False)),
        "max_chars": cfg.get("max_chars", None),
        "max_tokens": cfg.get("max_tokens", None),
        "tokenizer": cfg.get("tokenizer", None),
    }


@registry.register_processor("chinese_caption")
class ChineseCaptionProcessor(BaseProcessor):
    def __init__(self, prompt="", lowercase=False, max_chars=None, max_tokens=None, tokenizer=None):
        self.prompt = prompt or ""
        self.lowercase = lowercase
        self.truncate = _Truncation(max_chars, max_tokens, tokenizer)

    def normalize(self, caption: str) -> str:
        """The caption as used for training and references, without the prompt."""
        return self.truncate(normalize_chinese(caption, self.lowercase))

    def __call__(self, caption: str) -> str:
        return self.prompt + self.normalize(caption)

    @classmethod
    def from_config(cls, cfg=None):
        prompt = "" if cfg is None else cfg.get("prompt", "")
        return cls(prompt=prompt, **_options(cfg))


@registry.register_processor("chinese_question")
class ChineseQuestionProcessor(BaseProcessor):
    def __init__(self, lowercase=False, max_chars=None, max_tokens=None, tokenizer=None):
        self.lowercase = lowercase
        self.truncate = _Truncation(max_chars, max_tokens, tokenizer)

    def normalize(self, question: str) -> str:
        return self.truncate(normalize_chinese(question, self.lowercase))

    __call__ = normalize

    @classmethod
    def from_config(cls, cfg=None):
        return cls(**_options(cfg))
