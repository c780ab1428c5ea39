"""MMBench-format multiple-choice benchmarks (MMBench, MMBench-CN, CCBench) and their LAVIS builder ``mmbench``.

The three benchmarks share one TSV format (UTF-8, tab-separated, a header row; fields may be
quoted as pandas writes them, newlines inside quotes)::

    index  question  hint  A  B  C  D  answer  category  l2-category  image  source  split  comment

* ``index`` an integer; ``question`` the text; ``hint`` optional (empty or ``nan`` when absent);
* the options ``A``, ``B``, ... are the single-letter columns of the header in order (E, F may
  exist); a row may fill fewer of them, but always from ``A`` on without a gap, at least two;
* ``answer`` the letter of the right option; empty in the test splits, whose answers are kept
  by the benchmark's server;
* ``category`` (and ``l2-category`` where the file has it) name what a question tests;
* ``image`` a base64-encoded image, or (to save space) the ``index`` of another row whose image
  it shares.  Images are decoded when a sample is read, never all at once.

**Circular evaluation.**  A question with k options is asked k times, its options rotated
(``A B C D``, then ``B C D A``, ...), and counts as right only if every rotation is answered
right.  A file whose questions appear once is expanded here: rotation r shows at position j the
original option (j + r) mod k, and each rotation record maps its letters back to the original
ones.  Files published for VLMEvalKit already hold the rotated copies, as rows whose index is
``r * 1_000_000 + index``: those are taken as they are, grouped by ``index % 1_000_000`` (and each
copy's options and answer are checked against its original row's).  A file without answers
(a test split) is asked once per row, as written: its predictions make a submission file.

**Bad rows.**  A row with a missing column, a bad index, an empty question, a gap in its options,
undecodable base64, an answer that is missing (when the file has answers, or the row's ``split``
is ``dev``) or not one of its options, is an error naming the file, the row and its index; with
``skip_invalid: true`` in the dataset config, the question is left out (with all its rotations)
and the skips are counted in the log.  A file without the ``index``, ``question``, ``A``, ``B``
or ``image`` column is always an error.

The ``synthetic`` key of the dataset config has the builder write (and cache) a small file of
this format from the synthetic shapes images on first use (``datasets/mmbench_shapes.py``).
"""

from __future__ import annotations

import base64
import binascii
import csv
import hashlib
import io
import json
import logging
import os

import torch
from lavis.common.registry import registry
from lavis.datasets.builders.base_dataset_builder import BaseDatasetBuilder
from lavis.datasets.datasets.base_dataset import BaseDataset
from PIL import Image

from blip2_internlm.assets import generated
from blip2_internlm.datasets.chinese_captions import SPLITS, resolve, run_splits
from blip2_internlm.datasets.records import BadRecordError, CheckedMixin, builder_name
from blip2_internlm.paths import DATASET_CONFIG_DIR

logger = logging.getLogger(__name__)

LANGS = ("zh", "en")
#: VLMEvalKit's files number the rotated copies of question i as r * CIRCULAR_STRIDE + i.
CIRCULAR_STRIDE = 1_000_000
REQUIRED_COLUMNS = ("index", "question", "A", "B", "image")
#: An ``image`` cell this short is a reference to another row's index, not image data.
IMAGE_REFERENCE_MAX_LEN = 64
#: What pandas writes for a missing cell (NaN) and reads back as missing.
MISSING = ("", "nan", "NaN")
_REASONS_LOGGED = 3


def _missing(value) -> bool:
    return value is None or value.strip() in MISSING


# ----------------------------------------------------------------------------- reading the file


def _tsv_rows(path):
    """(header, iterator of (row number from 1, fields)) of a TSV file; ``BadRecordError`` naming it."""
    csv.field_size_limit(2**31 - 1)  # base64 images are far longer than csv's 128 KiB default
    try:
        handle = open(path, encoding="utf-8-sig", newline="")
    except FileNotFoundError:
        raise BadRecordError(f"MMBench file not found: {path}") from None

    def rows():
        with handle:
            reader = csv.reader(handle, delimiter="\t")
            try:
                header = next(reader, None)
                if header is None:
                    raise BadRecordError(f"{path} is empty: expected a header row")
                yield [name.strip() for name in header]
                for number, fields in enumerate(reader, start=1):
                    if fields:  # csv gives a blank line as []
                        yield number, fields
            except UnicodeDecodeError as err:
                raise BadRecordError(f"{path} is not UTF-8 text: {err}") from None
            except csv.Error as err:
                raise BadRecordError(f"{path}, near line {reader.line_num}: not a readable TSV: {err}") from None

    iterator = rows()
    return next(iterator), iterator


def option_columns(header) -> list[str]:
    """The option letters of a header: its single-letter upper-case columns, A first, without a gap."""
    letters = [name for name in header if len(name) == 1 and "A" <= name <= "Z"]
    return [chr(ord("A") + k) for k in range(len(letters)) if chr(ord("A") + k) in letters]


def _check_header(path, header) -> None:
    missing = [name for name in REQUIRED_COLUMNS if name not in header]
    if missing:
        raise BadRecordError(
            f"{path}: no column {', '.join(repr(m) for m in missing)} in its header {header[:16]}; "
            "expected an MMBench-format TSV (index, question, hint, A, B, ..., answer, category, image)"
        )
    duplicated = sorted({name for name in header if header.count(name) > 1})
    if duplicated:
        raise BadRecordError(f"{path}: the header names {duplicated} more than once")


def _image_problem(data: str) -> str | None:
    """Why an ``image`` cell holds no decodable image, or None (only the header is decoded)."""
    try:
        raw = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError) as err:
        return f"'image' is not valid base64 ({err})"
    try:
        with Image.open(io.BytesIO(raw)) as image:
            image.size  # noqa: B018  (the header parses)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        return f"'image' is base64 but not an image ({type(err).__name__}: {err})"
    return None


def _row(path, number, fields, header, letters):
    """``(row dict, problem)`` of one data row; the problem is a sentence or None."""
    where = f"{path}, row {number}"
    if len(fields) != len(header):
        return {"where": where}, f"has {len(fields)} fields where the header has {len(header)} columns"
    cells = dict(zip(header, fields))
    try:
        index = int(cells["index"].strip())
    except ValueError:
        return {"where": where}, f"'index' is {cells['index'][:40]!r}, not an integer"
    where = f"{path}, row {number} (index {index})"
    if index < 0:
        return {"where": where}, "'index' is negative"
    row = {"where": where, "index": index}
    question = cells["question"].strip()
    if _missing(question):
        return row, "'question' is empty"
    options = []
    for letter in letters:
        text = cells[letter]
        if _missing(text):
            break
        options.append(text.strip())
    gap = next((letter for letter in letters[len(options) :] if not _missing(cells[letter])), None)
    if gap is not None:
        return row, f"option {gap} is given but option {letters[len(options)]} is empty"
    if len(options) < 2:
        return row, f"has {len(options)} option{'s' * (len(options) != 1)}; a question needs at least A and B"
    answer = "" if _missing(cells.get("answer")) else cells["answer"].strip().upper()
    if answer and answer not in letters[: len(options)]:
        return row, f"its answer {answer!r} is not one of its options {''.join(letters[: len(options)])}"
    image = cells["image"].strip()
    if not image:
        return row, "'image' is empty"
    hint = cells.get("hint")
    row.update(
        question=question,
        hint="" if _missing(hint) else hint.strip(),
        options=options,
        answer=answer,
        category="" if _missing(cells.get("category")) else cells["category"].strip(),
        l2_category="" if _missing(cells.get("l2-category")) else cells["l2-category"].strip(),
        split="" if _missing(cells.get("split")) else cells["split"].strip().lower(),
        image=image,
    )
    return row, None


class _Problems:
    """Bad rows: raised at once, or (``skip_invalid``) collected by question index."""

    def __init__(self, path, skip_invalid: bool):
        self.path, self.skip_invalid = path, skip_invalid
        self.reasons: list[str] = []
        self.bad_questions: set[int] = set()
        self.bad_rows = 0

    def add(self, row: dict, problem: str) -> None:
        text = f"{row['where']}: {problem}"
        if not self.skip_invalid:
            raise BadRecordError(f"{text} (set skip_invalid: true to skip such questions)")
        self.reasons.append(text)
        self.bad_rows += 1
        if "index" in row:
            self.bad_questions.add(row["index"] % CIRCULAR_STRIDE)


def read_mmbench_tsv(path, skip_invalid: bool = False):
    """``(rows, images, report)`` of an MMBench-format TSV, every row checked.

    ``rows``: the good rows in file order, each ``{"where", "index", "question", "hint",
    "options": [texts], "answer": letter or "", "category", "l2_category", "split", "image_key"}``;
    ``images``: ``image_key -> base64 text`` (a row that refers to another's image gets that
    row's key); ``report``: ``{"rows", "skipped_rows", "skipped_questions", "has_answers",
    "has_copies"}``.  A bad row raises ``BadRecordError`` naming file, row and index, or with
    ``skip_invalid`` drops its question (every row of it) and is counted.
    """
    header, numbered = _tsv_rows(path)
    _check_header(path, header)
    letters = option_columns(header)
    problems = _Problems(path, skip_invalid)
    rows, seen = [], {}
    for number, fields in numbered:
        row, problem = _row(path, number, fields, header, letters)
        if problem is None and row["index"] in seen:
            problem = f"repeats the index of {seen[row['index']]}"
        if problem is not None:
            problems.add(row, problem)
            continue
        seen[row["index"]] = row["where"]
        rows.append(row)
    if not rows and not problems.bad_rows:
        raise BadRecordError(f"{path} has a header but no rows")

    images, references = {}, {}
    for row in rows:
        if len(row["image"]) <= IMAGE_REFERENCE_MAX_LEN and row["image"].isdigit():
            references[row["index"]] = int(row["image"])
        else:
            images[row["index"]] = row["image"]
    bad_images = {key: problem for key, data in images.items() if (problem := _image_problem(data))}
    good = []
    for row in rows:
        key = references.get(row["index"], row["index"])
        problem = None
        if key not in images:
            problem = f"'image' refers to index {key}, which has no image data in {path}"
        elif key in bad_images:
            problem = bad_images[key] if key == row["index"] else f"the image of index {key} it refers to is bad"
        if problem is not None:
            problems.add(row, problem)
            continue
        row["image_key"] = key
        del row["image"]
        good.append(row)

    has_answers = any(row["answer"] for row in good)
    for row in good:
        if not row["answer"] and (has_answers or row["split"] == "dev"):
            reason = "other rows of the file have answers" if has_answers else "its split is 'dev'"
            problems.add(row, f"has no answer ({reason})")
    has_copies = any(row["index"] >= CIRCULAR_STRIDE for row in good)
    if has_copies:
        _check_copies(good, problems)
    kept = [row for row in good if row["index"] % CIRCULAR_STRIDE not in problems.bad_questions]
    used = {row["image_key"] for row in kept}
    images = {key: data for key, data in images.items() if key in used}
    if problems.bad_rows:
        logger.warning(
            "Skipped %d questions (%d bad rows) of %s (skip_invalid: true), first: %s",
            len(problems.bad_questions),
            problems.bad_rows,
            path,
            "; ".join(problems.reasons[:_REASONS_LOGGED]),
        )
    if not kept:
        raise BadRecordError(f"no usable questions in {path}")
    report = {
        "rows": len(kept),
        "skipped_rows": problems.bad_rows,
        "skipped_questions": len(problems.bad_questions),
        "has_answers": has_answers,
        "has_copies": has_copies,
    }
    return kept, images, report


def _check_copies(rows, problems: _Problems) -> None:
    """Each rotated copy (index >= CIRCULAR_STRIDE) against its original row: same options, same answer."""
    originals = {row["index"]: row for row in rows if row["index"] < CIRCULAR_STRIDE}
    for row in rows:
        if row["index"] < CIRCULAR_STRIDE:
            continue
        base = originals.get(row["index"] % CIRCULAR_STRIDE)
        if base is None:
            problems.add(row, f"is a rotated copy of index {row['index'] % CIRCULAR_STRIDE}, which is not in the file")
        elif sorted(row["options"]) != sorted(base["options"]) or len(set(base["options"])) != len(base["options"]):
            problems.add(row, f"its options are not those of index {base['index']} in another order")
        elif row["answer"] and base["answer"]:
            mine = row["options"][ord(row["answer"]) - ord("A")]
            theirs = base["options"][ord(base["answer"]) - ord("A")]
            if mine != theirs:
                problems.add(row, f"its answer is {mine!r}, index {base['index']}'s is {theirs!r}")


# ----------------------------------------------------------------------------- rotations


def letters_of(count: int) -> list[str]:
    return [chr(ord("A") + k) for k in range(count)]


def rotate(options, answer: str, rotation: int):
    """``(shown options, original letter of each shown position, shown answer letter)`` of rotation r:
    position j shows original option (j + r) mod k."""
    k = len(options)
    original = [letters_of(k)[(j + rotation) % k] for j in range(k)]
    shown = [options[(j + rotation) % k] for j in range(k)]
    shown_answer = letters_of(k)[original.index(answer)] if answer else ""
    return shown, original, shown_answer


def rotation_records(rows, circular: bool) -> list[dict]:
    """One record per question asked: every rotation of each question (``circular``, a file with
    answers and without copies), else every row as written (copies grouped by their original index).

    A record: ``{"qid": "<index>:<rotation>", "index": the question's index, "row_index": the TSV
    row it answers, "rotation", "question", "hint", "options": [[letter, text], ...] as shown,
    "original_letters": the original letter of each shown position, "answer": shown letter or "",
    "category", "l2_category", "image_key", "where"}``.
    """
    expand = circular and not any(row["index"] >= CIRCULAR_STRIDE for row in rows)
    expand = expand and all(row["answer"] for row in rows)
    originals = {row["index"]: row for row in rows if row["index"] < CIRCULAR_STRIDE}
    records = []
    for row in rows:
        index, rotation = row["index"] % CIRCULAR_STRIDE, row["index"] // CIRCULAR_STRIDE
        if rotation and not circular:
            continue
        if expand:
            variants = [rotate(row["options"], row["answer"], r) + (r,) for r in range(len(row["options"]))]
        else:
            base = originals.get(index, row)["options"]
            original = [letters_of(len(base))[base.index(text)] for text in row["options"]]
            variants = [(row["options"], original, row["answer"], rotation)]
        for shown, original, answer, r in variants:
            records.append(
                {
                    "qid": f"{index}:{r}",
                    "index": index,
                    "row_index": row["index"],
                    "rotation": r,
                    "question": row["question"],
                    "hint": row["hint"],
                    "options": [[letter, text] for letter, text in zip(letters_of(len(shown)), shown)],
                    "original_letters": original,
                    "answer": answer,
                    "category": row["category"],
                    "l2_category": row["l2_category"],
                    "image_key": row["image_key"],
                    "where": row["where"],
                }
            )
    return records


# ----------------------------------------------------------------------------- dataset


def decode_image(data: str, where: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(base64.b64decode(data))) as image:
            return image.convert("RGB")
    except (OSError, ValueError, binascii.Error) as err:
        raise BadRecordError(f"{where}: cannot decode its image: {err}") from None


class MMBenchDataset(CheckedMixin, BaseDataset):
    """Samples ``{"image", "question", "hint", "options", "qid", "index", "row_index", "rotation", "answer",
    "original_letters", "category", "l2_category", "lang"}``, one per rotation record."""

    def __init__(self, vis_processor, text_processor, path, records, images, lang: str, report=None):
        super().__init__(vis_processor, text_processor, vis_root="", ann_paths=[])
        self.path, self.lang = path, lang
        self.annotation = list(records)
        self.images = images
        self.report = dict(report or {})
        self._add_instance_ids()

    def load(self, index):
        record = self.annotation[index]
        image = decode_image(self.images[record["image_key"]], record["where"])
        sample = {key: record[key] for key in ("question", "hint", "qid", "index", "row_index", "rotation", "answer")}
        sample.update(
            image=self.vis_processor(image),
            options=[list(option) for option in record["options"]],
            original_letters=list(record["original_letters"]),
            category=record["category"],
            l2_category=record["l2_category"],
            lang=self.lang,
        )
        return sample

    def collater(self, samples):
        """Tensors stacked, everything else (texts, option lists of different lengths) as lists."""
        batch = {}
        for key in samples[0]:
            values = [sample[key] for sample in samples]
            batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
        return batch


# ----------------------------------------------------------------------------- the synthetic file

SYNTHETIC_KEYS = {"split": "test", "lang": "zh", "images": 16, "seed": 0, "image_size": 64, "answers": True}


def synthetic_args(name: str, block) -> dict:
    """The ``synthetic`` block of a dataset config, with its defaults; an unknown key is an error naming it."""
    block = dict(block)
    unknown = sorted(set(block) - set(SYNTHETIC_KEYS))
    if unknown:
        raise ValueError(f"datasets.{name}.synthetic: unknown keys {unknown}; expected some of {list(SYNTHETIC_KEYS)}")
    args = {**SYNTHETIC_KEYS, **block}
    if args["split"] not in SPLITS:
        raise ValueError(f"datasets.{name}.synthetic.split = {args['split']!r}; expected one of {SPLITS}")
    return args


def synthetic_tsv(args: dict) -> str:
    """The synthetic file for ``args`` in the asset cache, written on first use."""
    params = {key: args[key] for key in ("lang", "images", "seed", "image_size", "answers")}
    # imported here: importing the package never loads the command's module, so `python -m` runs it cleanly
    from blip2_internlm.datasets.mmbench_shapes import write_shapes_tsv

    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    folder = generated(f"mmbench-shapes-{digest}", lambda tmp: write_shapes_tsv(tmp / "mmbench.tsv", **params))
    return str(folder / "mmbench.tsv")


# ----------------------------------------------------------------------------- builder


@registry.register_builder("mmbench")
class MMBenchBuilder(BaseDatasetBuilder):
    """Each split under ``build_info.annotations.<split>.storage`` from one MMBench-format TSV; the split
    ``synthetic.split`` (when ``synthetic`` is set) from the shapes file instead.  ``lang`` picks the
    prompt language, ``circular`` the rotations."""

    train_dataset_cls = eval_dataset_cls = MMBenchDataset
    DATASET_CONFIG_DICT = {"default": os.path.join(DATASET_CONFIG_DIR, "mmbench", "defaults.yaml")}

    def name(self) -> str:
        return builder_name(self)

    def lang(self) -> str:
        lang = self.config.get("lang", None)
        if lang not in LANGS:
            raise ValueError(f"datasets.{self.name()}.lang = {lang!r}; expected one of {LANGS}")
        return lang

    def synthetic(self) -> dict | None:
        block = self.config.get("synthetic", None)
        return None if block is None else synthetic_args(self.name(), block)

    def _download_data(self):
        """Nothing to fetch (the user provides the files); the synthetic file is written here, on rank 0."""
        args = self.synthetic()
        if args is not None:
            synthetic_tsv(args)

    def split_files(self) -> dict[str, str]:
        """``split -> TSV path`` of the configured splits; a split the run uses must have its file."""
        args = self.synthetic()
        files = {} if args is None else {args["split"]: synthetic_tsv(args)}
        used = run_splits()
        for split, info in (self.config.build_info.get("annotations", None) or {}).items():
            if split not in SPLITS or info is None or split in files:
                continue
            key = f"datasets.{self.name()}.build_info.annotations.{split}.storage"
            storage = info.get("storage", None)
            if not storage or not isinstance(storage, str):
                raise BadRecordError(f"{key} must be the path of one MMBench-format .tsv file, got {storage!r}")
            path = resolve(storage)
            if os.path.isfile(path):
                files[split] = path
            elif used is not None and split not in used:
                logger.info("%s: no file at %s; split %r is not built (the run does not use it)", key, path, split)
            else:
                raise BadRecordError(f"{key}: no file at {path}")
        if not files:
            raise BadRecordError(f"datasets.{self.name()}: no split has a file under build_info.annotations")
        return files

    def build(self):
        self.build_processors()
        lang, circular = self.lang(), bool(self.config.get("circular", True))
        skip_invalid = bool(self.config.get("skip_invalid", False))
        datasets = {}
        for split, path in self.split_files().items():
            rows, images, report = read_mmbench_tsv(path, skip_invalid)
            records = rotation_records(rows, circular)
            logger.info(
                "%s %s: %d questions, %d records to ask (%s)",
                self.name(),
                split,
                len({r["index"] for r in records}),
                len(records),
                path,
            )
            kind = "train" if split == "train" else "eval"
            datasets[split] = self.eval_dataset_cls(
                vis_processor=self.vis_processors[kind],
                text_processor=self.text_processors[kind],
                path=path,
                records=records,
                images=images,
                lang=lang,
                report=report,
            )
        return datasets
