"""``task: captioning_offline``: LAVIS's captioning task, scored locally, in any language.

LAVIS's ``captioning`` downloads the COCO Karpathy ground truth for every evaluation and
scores it with ``COCOEvalCap``, whose PTB tokenizer and METEOR need Java, whose SPICE
downloads Stanford CoreNLP at run time, and which leaves a Chinese caption as one token.
This task scores with pycocoevalcap's own scorers on text tokenized here, in Python:

``run.caption_tokenizer`` (the choice is printed with the scores and stored in them):

* ``char`` (default; Chinese): full-width ASCII folded to half-width, lowercased, every
  character its own token except runs of ASCII letters/digits, which stay one token
  ("T恤" -> "t 恤", "3个" -> "3 个"); Unicode punctuation (category P*) is dropped.
* ``jieba``: jieba's word segmentation (its bundled dictionary, a private ``Tokenizer``
  whose cache lives in ``$BLIP2_INTERNLM_CACHE/jieba``) of the width-folded text, tokens
  lowercased, punctuation tokens dropped.  Segmentation runs before lowercasing because
  jieba's dictionary is cased ("T恤" is one word, "t恤" is not).
* ``words`` (English): a Python rendering of what ``COCOEvalCap`` does with Stanford's
  PTBTokenizer (``-lowerCase -preserveLines``) followed by its ``PUNCTUATIONS`` removal:
  clitics split off ("man's" -> "man 's", "don't" -> "do n't", "can't" -> "ca n't",
  "cannot" -> "can not", "gonna" -> "gon na"), hyphenated words, decimals, "1,000",
  "10:30", "black/white" and "o'clock" kept whole, letter-period acronyms ("u.s.",
  "p.m.") and a list of abbreviations ("mr.", "st.", "etc.") keep their period,
  ``$ % & * / @ #`` and runs such as "?!" become tokens of their own, and quotes, brackets,
  ``. ? ! , : ; - -- ...`` are dropped.  Known differences from the Java tokenizer, all
  rare in captions: brackets are dropped (``COCOEvalCap`` keeps them as "-lrb-" etc.,
  because it compares its punctuation list with lowercased output); Stanford's
  abbreviation list is larger and context-sensitive (a single letter before a period,
  "vitamin c.", keeps it there, not here); a clitic inside a hyphenated word
  ("bull's-eye") is not split; "'tis", "y'all", "more'n", hashtags ("#fun" stays one
  token there) and smileys are tokenized differently; no British-to-American respelling (Stanford
  does none with these options either).

``run.caption_metrics`` (default ``[Bleu, ROUGE_L, CIDEr]``, all pure Python): Bleu gives
``Bleu_1..4``; ``METEOR`` and ``SPICE`` run only when their requirements are present
(Java on PATH; for SPICE also the Stanford CoreNLP 3.6.0 jars already in pycocoevalcap's
``spice/lib``; nothing is downloaded) and with ``words`` tokens (both are English-only);
otherwise they are listed under ``"skipped"`` with the reason.  Exact match (against any
reference, on tokens) is always reported; ``agg_metrics`` is ``CIDEr + Bleu_4`` as in
LAVIS.  Scores are percentages (LAVIS reports fractions).

References come from the evaluated dataset itself: ``references()`` if it has one, else
its COCO-format ``gt_file``, else, for LAVIS's ``coco_caption`` eval datasets, their own
Karpathy annotation records.  Each evaluation appends ``{"<split>": {scores}}`` to
``<output_dir>/evaluate.txt``, as LAVIS's ``CaptionTask`` does.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import unicodedata
from collections import defaultdict

from lavis.common.dist_utils import main_process
from lavis.common.registry import registry
from lavis.tasks.captioning import CaptionTask

MODES = ("char", "jieba", "words")
OFFLINE_METRICS = ("Bleu", "ROUGE_L", "CIDEr")
OPTIONAL_METRICS = ("METEOR", "SPICE")


def _fold(text: str) -> str:
    """Full-width ASCII (U+FF01..U+FF5E) and the ideographic space to their half-width forms."""
    return "".join(
        chr(ord(ch) - 0xFEE0) if 0xFF01 <= ord(ch) <= 0xFF5E else " " if ch == "\u3000" else ch for ch in text
    )


def _is_punctuation(token: str) -> bool:
    return all(unicodedata.category(ch).startswith("P") or ch.isspace() for ch in token)


_CHAR_TOKEN = re.compile(r"[a-z0-9]+|\S")


@functools.lru_cache(maxsize=1)
def _jieba():
    """A private jieba Tokenizer: nobody else's user words change our segmentation."""
    import jieba

    from blip2_internlm.assets import cache_dir

    tokenizer = jieba.Tokenizer()
    # jieba writes its prefix-dict cache to the system temp dir unless told otherwise; the
    # write is mkstemp + rename, so ranks racing on first use are safe.
    tokenizer.tmp_dir = str(cache_dir() / "jieba")
    os.makedirs(tokenizer.tmp_dir, exist_ok=True)
    level = jieba.default_logger.level
    jieba.default_logger.setLevel(logging.WARNING)  # it logs "Building prefix dict" at DEBUG to stderr
    try:
        tokenizer.initialize()
    finally:
        jieba.default_logger.setLevel(level)
    return tokenizer


# --- words: Stanford PTBTokenizer as COCOEvalCap runs it, in Python ------------------------

_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st jr sr mt vs etc inc ltd co corp gen prof capt sgt lt col ave blvd rd "
    "jan feb mar apr jun jul aug sep sept oct nov dec".split()
)
_WHOLE_WORD_SPLITS = {
    "cannot": ("can", "not"),
    "gonna": ("gon", "na"),
    "gotta": ("got", "ta"),
    "wanna": ("wan", "na"),
    "gimme": ("gim", "me"),
    "lemme": ("lem", "me"),
}
_CLITIC = re.compile(r"^(.+?)(n't|'s|'ll|'re|'ve|'m|'d)$")
_PTB_TOKEN = re.compile(
    r"""
    (?P<acronym>(?:[^\W\d_]\.){2,})                          # u.s.  p.m.  e.g.
  | (?P<word>(?:\d+(?:[,:]\d+)+|\w+)                         # 1,000  10:30  or a plain word,
        (?:(?:[-/.]|'(?=[^\W\d_]))\w+)*)(?P<period>\.)?     # joined by - / . or an apostrophe
  | '\d\ds | 'n'                                             # '90s  rock 'n' roll
  | [?!]+ | \.{2,} | -{2,} | \S
    """,
    re.VERBOSE,
)
# What COCOEvalCap removes after tokenizing, with the raw forms its tokenizer maps onto them.
_PTB_DROPPED = frozenset(["''", "'", "``", "`", '"', ".", "?", "!", ",", ":", "-", "--", "...", ";"]) | frozenset(
    "()[]{}"
)
_PTB_CHARS = str.maketrans(
    {"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "--", "\u2014": "--", "\u2026": "..."}
)


def _ptb_tokens(text: str):
    text = text.translate(_PTB_CHARS).lower()
    for match in _PTB_TOKEN.finditer(text):
        word = match.group("word")
        if word is None:
            token = match.group(0)
            if token not in _PTB_DROPPED and not re.fullmatch(r"\.+|-+", token):
                yield token
            continue
        if word in _WHOLE_WORD_SPLITS:
            yield from _WHOLE_WORD_SPLITS[word]
        else:
            clitics = []
            while split := _CLITIC.match(word):
                word = split.group(1)
                clitics.insert(0, split.group(2))
            numbered = word == "no" and re.match(r"\s*\d", text[match.end() :])  # "no. 5", not "there is no."
            if match.group("period") and not clitics and (word in _ABBREVIATIONS or numbered):
                word += "."  # an abbreviation keeps its period; elsewhere the period is dropped
            yield word
            yield from clitics


def tokenize(text: str, mode: str) -> str:
    """Space-joined tokens of ``text`` as pycocoevalcap's scorers expect them."""
    if mode == "char":
        return " ".join(t for t in _CHAR_TOKEN.findall(_fold(text).lower()) if not _is_punctuation(t))
    if mode == "jieba":
        words = (w.strip().lower() for w in _jieba().cut(_fold(text)))
        return " ".join(w for w in words if w and not _is_punctuation(w))
    if mode == "words":
        return " ".join(_ptb_tokens(text))
    raise ValueError(f"run.caption_tokenizer = {mode!r}; expected one of {', '.join(MODES)}")


# --- metrics -------------------------------------------------------------------------------


def check_metrics(metrics) -> tuple:
    """``run.caption_metrics`` validated; ``Bleu_4`` etc. are read as ``Bleu``."""
    if isinstance(metrics, str):  # --options run.caption_metrics=Bleu,CIDEr
        metrics = metrics.split(",")
    names = []
    for name in metrics:
        name = str(name).strip()
        name = "Bleu" if re.fullmatch(r"Bleu(_[1-4])?", str(name)) else str(name)
        if name not in OFFLINE_METRICS + OPTIONAL_METRICS:
            known = ", ".join(OFFLINE_METRICS + OPTIONAL_METRICS)
            raise ValueError(f"run.caption_metrics: unknown metric {name!r}; expected some of {known}")
        if name not in names:
            names.append(name)
    if "Bleu" not in names or "CIDEr" not in names:
        raise ValueError("run.caption_metrics must include Bleu and CIDEr: agg_metrics is CIDEr + Bleu_4")
    return tuple(names)


def _pycocoevalcap_dir(*parts) -> str:
    import pycocoevalcap  # a namespace package: no __file__

    return os.path.join(list(pycocoevalcap.__path__)[0], *parts)


def missing_requirement(metric: str, mode: str):
    """Why ``metric`` cannot run here (a sentence), or None when it can."""
    if metric not in OPTIONAL_METRICS:
        return None
    if mode != "words":
        return f"English-only; needs run.caption_tokenizer: words (got {mode})"
    if shutil.which("java") is None:
        return "needs java on PATH"
    if metric == "METEOR":
        jar = _pycocoevalcap_dir("meteor", "meteor-1.5.jar")
        return None if os.path.isfile(jar) else f"needs {jar}"
    # pycocoevalcap's Spice() downloads these two when absent; we never let it
    needed = [_pycocoevalcap_dir("spice", "spice-1.0.jar")] + [
        _pycocoevalcap_dir("spice", "lib", f"stanford-corenlp-3.6.0{suffix}.jar") for suffix in ("", "-models")
    ]
    absent = [path for path in needed if not os.path.isfile(path)]
    return f"needs {' and '.join(absent)} (not downloaded)" if absent else None


def _scorer(metric: str):
    if metric == "Bleu":
        from pycocoevalcap.bleu.bleu import Bleu

        return Bleu(4)
    if metric == "ROUGE_L":
        from pycocoevalcap.rouge.rouge import Rouge

        return Rouge()
    if metric == "CIDEr":
        from pycocoevalcap.cider.cider import Cider

        return Cider()
    if metric == "METEOR":
        from pycocoevalcap.meteor.meteor import Meteor

        return Meteor()
    from pycocoevalcap.spice.spice import Spice

    return Spice()


def caption_scores(predictions: dict, references: dict, mode: str, metrics=OFFLINE_METRICS) -> dict:
    """Exact match, BLEU-1..4, ROUGE-L, CIDEr-D (and METEOR/SPICE if asked and possible), in percent.

    ``predictions``: image id -> caption; ``references``: image id -> captions; both are
    tokenized with ``mode`` first.  Metrics that cannot run are listed under ``"skipped"``.
    """
    metrics = check_metrics(metrics)
    ids = sorted(references)
    missing = [i for i in ids if i not in predictions]
    if missing:
        raise ValueError(f"no prediction for {len(missing)} images, e.g. {missing[:3]}")
    unreferenced = sorted(set(predictions) - set(references))
    if unreferenced:
        raise ValueError(f"{len(unreferenced)} predictions for images without references, e.g. {unreferenced[:3]}")
    empty = [i for i in ids if not references[i]]
    if empty:
        raise ValueError(f"{len(empty)} images have no reference captions, e.g. {empty[:3]}")
    res = {i: [tokenize(predictions[i], mode)] for i in ids}
    gts = {i: [tokenize(r, mode) for r in references[i]] for i in ids}
    scores, skipped = {}, {}
    for metric in metrics:
        reason = missing_requirement(metric, mode)
        if reason:
            skipped[metric] = reason
            logging.warning(f"caption evaluation: {metric} skipped: {reason}")
            continue
        scorer = _scorer(metric)
        score, _ = scorer.compute_score(gts, res, verbose=0) if metric == "Bleu" else scorer.compute_score(gts, res)
        if metric == "Bleu":
            scores.update({f"Bleu_{n + 1}": 100 * float(b) for n, b in enumerate(score)})
        else:
            scores[metric] = 100 * float(score)
    scores["exact_match"] = 100 * sum(res[i][0] in gts[i] for i in ids) / len(ids)
    if skipped:
        scores["skipped"] = skipped
    return scores


# --- references ------------------------------------------------------------------------------


def read_coco_references(path) -> dict:
    """image id -> captions from a COCO-format caption file (``annotations``)."""
    with open(path, encoding="utf-8") as handle:
        gt = json.load(handle)
    references = defaultdict(list)
    for k, ann in enumerate(gt.get("annotations", [])):
        if "image_id" not in ann or "caption" not in ann:
            raise ValueError(f"{path}: annotation {k} lacks image_id or caption")
        references[int(ann["image_id"])].append(ann["caption"])
    if not references:
        raise ValueError(f"{path}: no caption annotations")
    return dict(references)


def coco_karpathy_references(dataset) -> dict:
    """image id -> captions from a LAVIS ``COCOCapEvalDataset``'s own annotation records."""
    references = {}
    for k, ann in enumerate(dataset.annotation):
        captions = ann.get("caption")
        if "image" not in ann or not captions:
            raise ValueError(f"coco_caption eval record {k} lacks image or caption: {ann}")
        # the id COCOCapEvalDataset.__getitem__ gives the sample (the task casts it to int)
        image_id = int(ann["image"].split("/")[-1].strip(".jpg").split("_")[-1])
        references[image_id] = [captions] if isinstance(captions, str) else list(captions)
    return references


def reference_source(dataset):
    """A zero-argument callable giving ``dataset``'s references, or None if it has none."""
    if callable(getattr(dataset, "references", None)):
        return dataset.references
    if getattr(dataset, "gt_file", None):
        return functools.partial(read_coco_references, dataset.gt_file)
    from lavis.datasets.datasets.coco_caption_datasets import COCOCapEvalDataset

    if isinstance(dataset, COCOCapEvalDataset):
        return functools.partial(coco_karpathy_references, dataset)
    return None


@registry.register_task("captioning_offline")
class OfflineCaptionTask(CaptionTask):
    def __init__(
        self, num_beams, max_len, min_len, evaluate, report_metric=True, tokenizer="char", metrics=OFFLINE_METRICS
    ):
        super().__init__(num_beams, max_len, min_len, evaluate, report_metric)
        tokenize("", tokenizer)  # fail at set-up on an unknown mode
        self.tokenizer = tokenizer
        self.metrics = check_metrics(metrics)
        self.eval_splits = None  # None: every split of every dataset must have references
        self.reference_sources = {}

    @classmethod
    def setup_task(cls, cfg):
        run = cfg.run_cfg
        task = cls(
            num_beams=run.num_beams,
            max_len=run.max_len,
            min_len=run.min_len,
            evaluate=run.evaluate,
            report_metric=run.get("report_metric", True),
            tokenizer=run.get("caption_tokenizer", "char"),
            metrics=run.get("caption_metrics", OFFLINE_METRICS),
        )
        task.eval_splits = set(run.get("valid_splits", []) or []) | set(run.get("test_splits", []) or [])
        return task

    def build_datasets(self, cfg):
        datasets = super().build_datasets(cfg)
        for name, splits in datasets.items():
            for split, data in splits.items():
                if self.eval_splits is not None and split not in self.eval_splits:
                    continue
                source = reference_source(data)
                if source is None:
                    raise ValueError(
                        f"dataset {name!r}, split {split!r} ({type(data).__name__}) gives no references to score "
                        "captions against: task captioning_offline needs references(), gt_file or LAVIS's coco_caption"
                    )
                self.reference_sources.setdefault(split, []).append((name, source))
        return datasets

    def references(self, split_name) -> dict:
        """image id -> reference captions for ``split_name``, from every dataset evaluated on it."""
        if split_name not in self.reference_sources:
            raise ValueError(f"no dataset gives references for split {split_name!r} (task captioning_offline)")
        references, owner = {}, {}
        for name, source in self.reference_sources[split_name]:
            for image_id, captions in source().items():
                image_id = int(image_id)
                if image_id in owner:
                    raise ValueError(
                        f"split {split_name!r}: image id {image_id} is in both {owner[image_id]!r} and {name!r}"
                    )
                owner[image_id], references[image_id] = name, list(captions)
        return references

    @main_process
    def _report_metrics(self, eval_result_file, split_name):
        with open(eval_result_file, encoding="utf-8") as handle:
            predictions = {int(r["image_id"]): r["caption"] for r in json.load(handle)}
        scores = caption_scores(predictions, self.references(split_name), self.tokenizer, self.metrics)
        scores["agg_metrics"] = scores["CIDEr"] + scores["Bleu_4"]
        scores["tokenizer"] = self.tokenizer
        print(f"{split_name} captions scored on {self.tokenizer} tokens:", flush=True)
        for metric, score in scores.items():
            if isinstance(score, float):
                print(f"{metric}: {score:.3f}", flush=True)
        for metric, reason in scores.get("skipped", {}).items():
            print(f"{metric}: skipped ({reason})", flush=True)
        with open(os.path.join(registry.get_path("output_dir"), "evaluate.txt"), "a", encoding="utf-8") as f:
            f.write(json.dumps({split_name: scores}, ensure_ascii=False) + "\n")
        return scores
