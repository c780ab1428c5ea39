"""``task: mmbench``: multiple-choice evaluation of MMBench-format data (MMBench, MMBench-CN, CCBench).

Each sample (``datasets/mmbench.py``: one rotation of one question) becomes a prompt, in the
dataset's ``lang``::

    Hint: {hint}                      提示：{hint}              (only when the row has one)
    Question: {question}              问题：{question}
    Options:                          选项：
    A. {option A}                     A. {option A}
    B. ...                            B. ...
    Answer with the option's letter from the given choices directly.      请直接回答选项字母。
    Answer:                           答案：                    (base models only)

A chat model (``blip2_internlm_instruct``, which has ``chat``) gets the prompt without the last
line as its user turn; a base model (``blip2_internlm``) continues after it.  The model's
``generate`` writes the answer (``run.num_beams``, ``max_len``, ``min_len``), and
``extract_choice`` reads the letter it chose (rules in its docstring and docs/mmbench.md); an
answer it cannot read counts as wrong, and is counted as "no choice".

Scores (percentages): ``circular_accuracy`` (a question is right when every rotation is),
``vanilla_accuracy`` (its first rotation, the options as the file lists them), both overall and
per ``category`` and ``l2_category``; ``agg_metrics`` is the circular accuracy.  Per split, rank 0
writes ``<result_dir>/mmbench_<split>_questions.jsonl`` (one line per question: answer, every
rotation's raw prediction and choice, in shown and original letters) and
``mmbench_<split>_metrics.json``, and appends ``{"<split>": metrics}`` to
``<output_dir>/evaluate.txt``.  Every rank's answers are merged first (LAVIS's ``save_result``),
duplicates from the distributed sampler's padding dropped, and a missing one is an error.

A split without answers (a test split) is scored by the benchmark's server: rank 0 writes
``mmbench_<split>_submission.tsv`` (``index``, ``prediction``: the letter chosen for each row of
the file, empty for no choice) and reports only its path and counts, without ``agg_metrics``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import unicodedata
from collections import defaultdict

from lavis.common.dist_utils import main_process
from lavis.common.registry import registry
from lavis.tasks.base_task import BaseTask

from blip2_internlm.datasets.mmbench import LANGS, MMBenchDataset

logger = logging.getLogger(__name__)

TEMPLATES = {
    "en": {
        "hint": "Hint: {}\n",
        "question": "Question: {}\n",
        "options": "Options:\n",
        "instruction": "Answer with the option's letter from the given choices directly.",
        "answer": "\nAnswer:",
    },
    "zh": {
        "hint": "提示：{}\n",
        "question": "问题：{}\n",
        "options": "选项：\n",
        "instruction": "请直接回答选项字母。",
        "answer": "\n答案：",
    },
}


def build_prompt(question: str, hint: str, options, lang: str, chat: bool = False) -> str:
    """The prompt of one rotation; ``options`` are ``(letter, text)`` pairs as shown."""
    if lang not in TEMPLATES:
        raise ValueError(f"lang = {lang!r}; expected one of {LANGS}")
    words = TEMPLATES[lang]
    text = words["hint"].format(hint) if hint else ""
    text += words["question"].format(question) + words["options"]
    text += "".join(f"{letter}. {option}\n" for letter, option in options)
    text += words["instruction"]
    return text if chat else text + words["answer"]


# ----------------------------------------------------------------------------- answer extraction

_DECORATION = r"\s\"'“”‘’()\[\]{}<>*"
_BARE_LETTER = re.compile(rf"[{_DECORATION}]*([A-Za-z])[{_DECORATION}.,:;!?、。，：；！？]*")
# "The answer is B", "answer: (C)", "Option D", "I choose A"; the letter upper case, a word of its own
_EXPLICIT_EN = re.compile(
    r"(?i:\banswer\s*(?:is|should\s+be|would\s+be|:)?\s*(?:option\s*)?|\boption\s*|\b(?:choose|choice\s+is|select)\s*)"
    r"[\(\[]?([A-Z])(?![A-Za-z0-9])"
)
# 答案是A / 答案：C / 答案为(B) / 选项B / 选择D / 选B / 应选C
_EXPLICIT_ZH = re.compile(
    r"(?:答案|选项|选择|应选|应该选|选)\s*(?:是|为|应该是|应为|：|:)?\s*[\(\[（]?([A-Za-z])(?![A-Za-z0-9])"
)
_LETTER = re.compile(r"(?<![A-Za-z0-9])([A-Z])(?![A-Za-z0-9])")
# After "A" and a space, these words make it the option letter; any other lower-case word, the article.
_AFTER_LETTER_A = frozenset("or and nor is was seems would should because vs then".split())


def _normalised(text: str) -> str:
    """NFKC (full-width letters and punctuation to ASCII), lower case, punctuation to spaces, spaces squeezed."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text)
    return " ".join(text.split())


def _contains(text: str, option: str) -> bool:
    """``option`` inside ``text``, as whole words where it starts or ends with an ASCII letter or digit."""
    if not option:
        return False
    left = r"(?<![a-z0-9])" if option[0].isascii() and option[0].isalnum() else ""
    right = r"(?![a-z0-9])" if option[-1].isascii() and option[-1].isalnum() else ""
    return re.search(left + re.escape(option) + right, text) is not None


def _one(letters) -> str | None:
    letters = set(letters)
    return letters.pop() if len(letters) == 1 else None


def extract_choice(text: str, options) -> str | None:
    """The option letter an answer chose, or None (no choice: empty, unreadable or ambiguous).

    ``options``: ``{letter: text}`` (or ``(letter, text)`` pairs) as the question showed them.
    Tried in order, the first rule that finds anything decides:

    1. the whole answer is one letter, maybe bracketed or followed by punctuation: "B", "(C)",
       "D.", "b", full-width "Ａ";
    2. an explicit statement: "The answer is B", "answer: (C)", "Option D", "答案是A", "答案：C",
       "选B", "选项D"; two different letters stated ("答案是A或选B") are ambiguous;
    3. the option letters standing alone in the text ("(A) a red circle", "我认为是C"); "A"
       followed by a lower-case word is the English article ("A red circle"), except before
       "or", "and", "is", ...; more than one letter ("A or B", "A和B") is ambiguous;
    4. the option texts: the answer equal to one (after NFKC, lower case, punctuation removed),
       else the options contained in it (as whole words for English), leaving out any contained
       in another contained one ("深红色" holds "红色"); more than one left is ambiguous.

    Letters that are not among ``options`` never count.
    """
    options = dict(options)
    letters = set(options)
    raw = unicodedata.normalize("NFKC", text or "").strip()
    if not raw:
        return None
    bare = _BARE_LETTER.fullmatch(raw)
    if bare:
        letter = bare.group(1).upper()
        return letter if letter in letters else None
    stated = [m.group(1).upper() for m in _EXPLICIT_ZH.finditer(raw)] + [m.group(1) for m in _EXPLICIT_EN.finditer(raw)]
    stated = [letter for letter in stated if letter in letters]
    if stated:
        return _one(stated)
    standing = []
    for match in _LETTER.finditer(raw):
        letter = match.group(1)
        if letter not in letters:
            continue
        after = re.match(r"\s+([a-z]+)", raw[match.end() :])
        if letter == "A" and after and after.group(1) not in _AFTER_LETTER_A:
            continue  # the article
        standing.append(letter)
    if standing:
        return _one(standing)
    answer = _normalised(raw)
    texts = {letter: _normalised(option) for letter, option in options.items()}
    exact = [letter for letter, option in texts.items() if option and option == answer]
    if exact:
        return _one(exact)
    inside = [letter for letter, option in texts.items() if _contains(answer, option)]
    inside = [a for a in inside if not any(b != a and texts[a] != texts[b] and texts[a] in texts[b] for b in inside)]
    return _one(inside)


# ----------------------------------------------------------------------------- scoring


def _percent(part: int, whole: int) -> float:
    return 100.0 * part / whole if whole else 0.0


def group_questions(results) -> list[dict]:
    """One record per question from its rotations' results (each ``{"index", "rotation", "choice", "answer",
    ...}``): ``{"index", "category", "l2_category", "answer" (original letter), "circular", "vanilla",
    "rotations": [...]}`` in index order."""
    by_question = defaultdict(list)
    for result in results:
        by_question[result["index"]].append(result)
    questions = []
    for index in sorted(by_question):
        rotations = sorted(by_question[index], key=lambda r: r["rotation"])
        right = [bool(r["answer"]) and r["choice"] == r["answer"] for r in rotations]
        first = rotations[0]
        questions.append(
            {
                "index": index,
                "category": first.get("category", ""),
                "l2_category": first.get("l2_category", ""),
                "question": first.get("question", ""),
                "answer": _original(first, first["answer"]),
                "circular": all(right),
                "vanilla": right[0],
                "rotations": [
                    {
                        "rotation": r["rotation"],
                        "row_index": r.get("row_index", index),
                        "prediction": r.get("prediction", ""),
                        "choice": r["choice"],
                        "choice_original": _original(r, r["choice"]),
                        "answer": r["answer"],
                        "correct": ok,
                    }
                    for r, ok in zip(rotations, right)
                ],
            }
        )
    return questions


def _original(result: dict, letter: str | None) -> str | None:
    """The original letter of a shown one (None and "" stay as they are)."""
    if not letter:
        return letter
    original = result.get("original_letters")
    return original[ord(letter) - ord("A")] if original else letter


def _accuracies(questions) -> dict:
    return {
        "circular_accuracy": _percent(sum(q["circular"] for q in questions), len(questions)),
        "vanilla_accuracy": _percent(sum(q["vanilla"] for q in questions), len(questions)),
        "questions": len(questions),
    }


def score(results) -> tuple[dict, list[dict]]:
    """``(metrics, questions)`` of a split's rotation results (every rotation of every question).

    ``metrics``: ``circular_accuracy``, ``vanilla_accuracy`` (percent), ``agg_metrics`` (= circular),
    ``questions``, ``rotations``, ``no_choice`` (rotations whose answer named no option) and
    ``no_choice_rate``, ``by_category`` and, when the data has them, ``by_l2_category`` (each
    ``{circular_accuracy, vanilla_accuracy, questions}``).
    """
    results = list(results)
    questions = group_questions(results)
    metrics = _accuracies(questions)
    metrics["agg_metrics"] = metrics["circular_accuracy"]
    metrics["rotations"] = len(results)
    metrics["no_choice"] = sum(r["choice"] is None for r in results)
    metrics["no_choice_rate"] = _percent(metrics["no_choice"], len(results))
    for key in ("category", "l2_category"):
        groups = defaultdict(list)
        for question in questions:
            groups[question[key]].append(question)
        if key == "l2_category" and set(groups) == {""}:
            continue
        metrics[f"by_{key}"] = {name: _accuracies(groups[name]) for name in sorted(groups)}
    return metrics, questions


# ----------------------------------------------------------------------------- the task


def _is_chat_model(model) -> bool:
    return callable(getattr(model, "chat", None))


@registry.register_task("mmbench")
class MMBenchTask(BaseTask):
    def __init__(self, num_beams: int = 5, max_len: int = 10, min_len: int = 1, report_metric: bool = True):
        super().__init__()
        self.num_beams, self.max_len, self.min_len = int(num_beams), int(max_len), int(min_len)
        self.report_metric = report_metric
        self.expected = defaultdict(int)  # split -> records the datasets hold

    @classmethod
    def setup_task(cls, cfg):
        run = cfg.run_cfg
        defaults = {"num_beams": 5, "max_len": 10, "min_len": 1}
        values = {key: run.get(key, None) for key in defaults}
        return cls(
            **{key: default if values[key] is None else values[key] for key, default in defaults.items()},
            report_metric=run.get("report_metric", True),
        )

    def build_datasets(self, cfg):
        datasets = super().build_datasets(cfg)
        for name, splits in datasets.items():
            for split, data in splits.items():
                if not isinstance(data, MMBenchDataset):
                    raise ValueError(
                        f"task mmbench evaluates MMBench-format datasets (builder 'mmbench'); dataset {name!r}, "
                        f"split {split!r} is a {type(data).__name__}"
                    )
                self.expected[split] += len(data)
        return datasets

    def valid_step(self, model, samples):
        chat = _is_chat_model(model)
        prompts = [
            build_prompt(question, hint, options, lang, chat)
            for question, hint, options, lang in zip(
                samples["question"], samples["hint"], samples["options"], samples["lang"]
            )
        ]
        inputs = {key: samples[key] for key in ("image", "vit_embeds") if key in samples}
        texts = model.generate(
            {**inputs, "prompt": prompts}, num_beams=self.num_beams, max_length=self.max_len, min_length=self.min_len
        )
        if len(texts) != len(prompts):
            raise ValueError(f"the model answered {len(texts)} of {len(prompts)} questions")
        results = []
        for i, text in enumerate(texts):
            results.append(
                {
                    "qid": samples["qid"][i],
                    "index": int(samples["index"][i]),
                    "row_index": int(samples["row_index"][i]),
                    "rotation": int(samples["rotation"][i]),
                    "prediction": text,
                    "choice": extract_choice(text, samples["options"][i]),
                    "answer": samples["answer"][i],
                    "original_letters": list(samples["original_letters"][i]),
                    "question": samples["question"][i],
                    "category": samples["category"][i],
                    "l2_category": samples["l2_category"][i],
                }
            )
        return results

    def after_evaluation(self, val_result, split_name, epoch=None, **kwargs):
        result_file = self.save_result(
            result=val_result,
            result_dir=registry.get_path("result_dir"),
            filename=f"mmbench_{split_name}_rotations",
            remove_duplicate="",  # done in _report_metrics, in linear time
        )
        return self._report_metrics(result_file, split_name) if self.report_metric else {}

    @main_process
    def _report_metrics(self, result_file, split_name):
        with open(result_file, encoding="utf-8") as handle:
            merged = json.load(handle)
        results = list({result["qid"]: result for result in merged}.values())  # padding repeats some samples
        expected = self.expected.get(split_name)
        if expected is not None and len(results) != expected:
            raise ValueError(
                f"split {split_name!r}: {len(results)} distinct answers for {expected} questions asked "
                f"(merged from {result_file})"
            )
        result_dir = registry.get_path("result_dir")
        metrics, questions = score(results)
        with open(os.path.join(result_dir, f"mmbench_{split_name}_questions.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(question, ensure_ascii=False) + "\n" for question in questions)
        if not all(result["answer"] for result in results):
            metrics = self._write_submission(results, split_name, result_dir)
        else:
            print(
                f"{split_name}: circular accuracy {metrics['circular_accuracy']:.2f}, vanilla "
                f"{metrics['vanilla_accuracy']:.2f} ({metrics['questions']} questions, {metrics['no_choice']} of "
                f"{metrics['rotations']} answers named no option)",
                flush=True,
            )
            for name, scores in metrics["by_category"].items():
                print(f"  {name or '(no category)'}: circular {scores['circular_accuracy']:.2f}", flush=True)
        with open(os.path.join(result_dir, f"mmbench_{split_name}_metrics.json"), "w", encoding="utf-8") as f:
            f.write(json.dumps(metrics, ensure_ascii=False, indent=1) + "\n")
        with open(os.path.join(registry.get_path("output_dir"), "evaluate.txt"), "a", encoding="utf-8") as f:
            f.write(json.dumps({split_name: metrics}, ensure_ascii=False) + "\n")
        return metrics

    @staticmethod
    def _write_submission(results, split_name, result_dir) -> dict:
        """``index``/``prediction`` per row of the file, in index order; nothing is scored."""
        path = os.path.join(result_dir, f"mmbench_{split_name}_submission.tsv")
        rows = sorted(results, key=lambda r: r["row_index"])
        with open(path, "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
            writer.writerow(["index", "prediction"])
            writer.writerows([r["row_index"], r["choice"] or ""] for r in rows)
        no_choice = sum(r["choice"] is None for r in rows)
        print(f"{split_name}: no answers to score against; submission file {path}", flush=True)
        logger.info("%s: %d predictions written to %s", split_name, len(rows), path)
        return {"submission": path, "rows": len(rows), "no_choice": no_choice}
