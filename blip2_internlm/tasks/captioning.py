"""``task: captioning_offline``: LAVIS's captioning task, scored locally, in any language.

LAVIS's ``captioning`` downloads the COCO Karpathy ground truth for every evaluation and
scores with the PTB tokenizer (Java), which leaves a Chinese caption as one token.  This
task reads the ground truth that the dataset itself names (``gt_file``: COCO-format
captions, as the shapes data writes), tokenizes by characters (``run.caption_tokenizer:
char``, the default for Chinese) or by whitespace after lowercasing and stripping
punctuation (``words``), and reports exact match, BLEU-1..4 and CIDEr-D computed by
pycocoevalcap's own scorers.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict

from lavis.common.dist_utils import main_process
from lavis.common.registry import registry
from lavis.tasks.captioning import CaptionTask

_PUNCT = re.compile(r"[\s.,!?;:'\"()，。！？；：、“”‘’（）]+")


def tokenize(text: str, mode: str) -> str:
    """Space-joined tokens as pycocoevalcap's scorers expect them."""
    text = text.strip().lower()
    if mode == "char":
        return " ".join(ch for ch in _PUNCT.sub("", text))
    if mode == "words":
        return " ".join(_PUNCT.sub(" ", text).split())
    raise ValueError(f"run.caption_tokenizer = {mode!r}; expected 'char' or 'words'")


def caption_scores(predictions: dict, references: dict, mode: str) -> dict:
    """Exact match (against any reference), BLEU-1..4 and CIDEr-D, in percent, over image ids."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    ids = sorted(references)
    missing = [i for i in ids if i not in predictions]
    if missing:
        raise ValueError(f"no prediction for {len(missing)} images, e.g. {missing[:3]}")
    res = {i: [tokenize(predictions[i], mode)] for i in ids}
    gts = {i: [tokenize(r, mode) for r in references[i]] for i in ids}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    exact = sum(res[i][0] in gts[i] for i in ids) / len(ids)
    scores = {f"Bleu_{n + 1}": 100 * float(b) for n, b in enumerate(bleu)}
    scores.update({"CIDEr": 100 * float(cider), "exact_match": 100 * exact})
    return scores


def read_coco_references(path) -> dict:
    with open(path, encoding="utf-8") as handle:
        gt = json.load(handle)
    references = defaultdict(list)
    for ann in gt["annotations"]:
        references[int(ann["image_id"])].append(ann["caption"])
    return dict(references)


@registry.register_task("captioning_offline")
class OfflineCaptionTask(CaptionTask):
    def __init__(self, num_beams, max_len, min_len, evaluate, report_metric=True, tokenizer="char"):
        super().__init__(num_beams, max_len, min_len, evaluate, report_metric)
        tokenize("", tokenizer)  # fail at set-up on an unknown mode
        self.tokenizer = tokenizer
        self.gt_files = {}

    @classmethod
    def setup_task(cls, cfg):
        task = super().setup_task(cfg)
        task.tokenizer = cfg.run_cfg.get("caption_tokenizer", "char")
        tokenize("", task.tokenizer)
        task.gt_files = {}
        return task

    def build_datasets(self, cfg):
        datasets = super().build_datasets(cfg)
        for dataset in datasets.values():
            for split, data in dataset.items():
                if getattr(data, "gt_file", None):
                    self.gt_files[split] = data.gt_file
        return datasets

    @main_process
    def _report_metrics(self, eval_result_file, split_name):
        if split_name not in self.gt_files:
            raise ValueError(f"the {split_name} dataset names no ground-truth file (gt_file) to score against")
        with open(eval_result_file, encoding="utf-8") as handle:
            predictions = {int(r["image_id"]): r["caption"] for r in json.load(handle)}
        scores = caption_scores(predictions, read_coco_references(self.gt_files[split_name]), self.tokenizer)
        scores["agg_metrics"] = scores["CIDEr"] + scores["Bleu_4"]
        scores["tokenizer"] = self.tokenizer
        with open(os.path.join(registry.get_path("output_dir"), "evaluate.txt"), "a", encoding="utf-8") as f:
            f.write(json.dumps({split_name: scores}, ensure_ascii=False) + "\n")
        return scores
