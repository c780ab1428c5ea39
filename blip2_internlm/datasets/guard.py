"""Bad samples never kill a training run, and never pass unnoticed.

LAVIS's datasets raise from ``__getitem__`` on a corrupt image, a record without a key it
reads, or a caption the text processor empties; the error names neither file nor record and
stops the run mid-epoch.  ``GuardedDataset`` wraps a map-style dataset and applies one policy
to every such failure:

* ``error``: ``BadSampleError`` naming dataset, split, index, the record (its file under
  ``vis_root`` and its ids) and the cause.  Evaluation splits always use it: a dropped
  question would silently change the metric.
* ``skip`` (training, ``run.bad_samples: skip``): another index, drawn from
  (seed, epoch, index, attempt), stands in, so the batch keeps its size; a report of the bad
  one travels with the sample and the collater hands the batch's reports over as
  ``batch["bad_samples"]``.  ``BadSampleTally`` counts them in the training loop, logs each
  once and stops the run when they exceed ``run.max_bad_sample_fraction``.

Once ``set_epoch`` has been called, each sample is also drawn under RNGs (python, numpy,
torch CPU) seeded from (seed, epoch, index): its augmentation no longer depends on which
DataLoader worker or rank reads it, so ``num_workers`` does not change the batches and a run
resumed mid-epoch sees the samples an uninterrupted one would have seen.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections import Counter
from dataclasses import dataclass

import torch
from PIL import Image
from torch.utils.data import IterableDataset, default_collate

from blip2_internlm.datasets.records import BadRecordError
from blip2_internlm.seeding import derived_seed, seeded
from blip2_internlm.settings import Choice, Number, setting

logger = logging.getLogger(__name__)

POLICIES = ("skip", "error")
#: Sample keys that hold text the model reads: empty after processing means nothing to learn from.
TEXT_KEYS = ("text_input", "text_output", "caption", "question")
#: Where a substituted sample carries the reports of the bad ones it replaces, worker -> collater.
REPORTS_KEY = "_bad_sample_reports"
DEFAULT_MAX_SUBSTITUTES = 8
DEFAULT_MAX_BAD_FRACTION = 0.01
_RECORD_TEXT_LIMIT = 400


class BadSampleError(BadRecordError):
    """A sample that cannot be used, under ``error`` policy or after every substitute failed."""


class BadDataError(RuntimeError):
    """More bad samples than ``run.max_bad_sample_fraction`` allows."""


class _UnusableSample(ValueError):
    """The inner dataset returned a sample, but one the model cannot learn from."""


# ----------------------------------------------------------------------------- seeding


# ----------------------------------------------------------------------------- the wrapper


class GuardedDataset(torch.utils.data.Dataset):
    """``dataset`` whose bad samples raise a named error (``error``) or are replaced (``skip``)."""

    def __init__(
        self,
        dataset,
        policy: str = "skip",
        name: str | None = None,
        split: str | None = None,
        seed: int = 0,
        max_substitutes: int = DEFAULT_MAX_SUBSTITUTES,
        training: bool = True,
    ):
        if policy not in POLICIES:
            raise ValueError(f"run.bad_samples must be one of {list(POLICIES)}, got {policy!r}")
        self.dataset, self.policy = dataset, policy
        self.name, self.split = name or type(dataset).__name__, split or "?"
        self.seed, self.max_substitutes, self.training = int(seed), int(max_substitutes), bool(training)
        self.epoch: int | None = None

    def set_epoch(self, epoch: int) -> None:
        """Draw every sample under RNGs seeded from (seed, epoch, index) from now on.

        DataLoader workers get a fresh copy of the dataset at each ``iter(loader)``
        (``persistent_workers`` off, as LAVIS builds them): call this before it.
        """
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        reports, candidate = [], index
        for attempt in range(self.max_substitutes + 1):
            try:
                sample = self._load(candidate)
            except Exception as err:  # any failure of one record: the policy decides, not its type
                report = self.report(candidate, err)
                if self.policy == "error":
                    raise BadSampleError(self.describe(report, hint=self._hint())) from err
                reports.append(report)
                candidate = self.substitute(index, attempt)
                if candidate is None:
                    break
                continue
            sample = dict(sample)
            sample[REPORTS_KEY] = reports
            return sample
        listing = "\n".join(f"  - {self.describe(report)}" for report in reports)
        raise BadSampleError(
            f"{self.name} {self.split}, record {index} is bad and so were its {len(reports) - 1} substitutes:\n"
            + listing
        )

    def _load(self, index):
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; such a file is a bad sample, not a big one
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if self.epoch is None:
                sample = self.dataset[index]
            else:
                with seeded(derived_seed(self.seed, self.epoch, index)):
                    sample = self.dataset[index]
        problem = sample_problem(sample)
        if problem:
            raise _UnusableSample(problem)
        return sample

    def substitute(self, index: int, attempt: int) -> int | None:
        """The index that stands in for ``index`` at its ``attempt``-th failure (None: there is no other)."""
        size = len(self)
        if size < 2:
            return None
        candidate = derived_seed("substitute", self.seed, self.epoch or 0, index, attempt) % (size - 1)
        return candidate + 1 if candidate >= index else candidate  # any index but the bad one

    # reports

    def record(self, index):
        """The annotation record behind ``index``, or None when the dataset has no ``annotation`` list."""
        try:
            annotation = self.dataset.annotation
            return annotation[index]
        except (AttributeError, IndexError, KeyError, TypeError):
            return None

    def report(self, index: int, err: BaseException) -> dict:
        """What the logs, ``batch["bad_samples"]`` and the errors say about a bad sample."""
        record = self.record(index)
        file, ids = None, {}
        if isinstance(record, dict):
            image = record.get("image")
            if isinstance(image, str):
                file = os.path.join(str(getattr(self.dataset, "vis_root", "") or ""), image)
            ids = {
                key: value
                for key, value in record.items()
                if (key == "id" or key.endswith("_id") or key == "where") and isinstance(value, (str, int))
            }
        kind, reason = _cause(err, record)
        return {
            "dataset": self.name,
            "split": self.split,
            "index": int(index),
            "file": file,
            "ids": ids,
            "kind": kind,
            "reason": reason,
            "record": _short(record),
        }

    @staticmethod
    def describe(report: dict, hint: str = "") -> str:
        ids = ", ".join(f"{key}={value!r}" for key, value in report["ids"].items())
        where = "; ".join(part for part in (report["file"], ids) if part)
        text = f"{report['dataset']} {report['split']}, record {report['index']}"
        text += f" ({where})" if where else ""
        text += f": {report['reason']}"
        if report["record"] is not None:
            text += f"; record: {report['record']}"
        return text + (f" ({hint})" if hint else "")

    def _hint(self) -> str:
        if self.training:
            return "fix or remove the record, or set run.bad_samples: skip to train on without it"
        return "evaluation never skips a sample: fix or remove the record"

    # batching and the wrapped dataset

    def collater(self, samples):
        reports, plain = [], []
        for sample in samples:
            sample = dict(sample)
            reports.extend(sample.pop(REPORTS_KEY, None) or [])
            plain.append(sample)
        collate = getattr(self.dataset, "collater", None) or default_collate
        batch = collate(plain)
        batch["bad_samples"] = reports
        return batch

    def __getattr__(self, name):
        # annotation, vis_root, answer_list, ... of the wrapped dataset.  "dataset" itself is
        # missing while pickle/copy rebuild the wrapper: no recursion then.
        if name == "dataset" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __repr__(self):
        return f"GuardedDataset({self.name} {self.split}, policy={self.policy!r}, {len(self)} samples)"


def sample_problem(sample) -> str | None:
    """Why a processed sample is unusable, or None."""
    if not isinstance(sample, dict):
        return f"the dataset returned a {type(sample).__name__}, not a dict"
    # a feature-cache wrapper hands over the ViT's output in place of the image
    if sample.get("image") is None and "vit_embeds" not in sample:
        return "the sample has no image"
    for key in TEXT_KEYS:
        if key not in sample:
            continue
        text = sample[key]
        texts = text if isinstance(text, (list, tuple)) else [text]
        if not texts or not all(isinstance(item, str) for item in texts):
            return f"'{key}' is {type(text).__name__}, not text"
        if not all(item.strip() for item in texts):
            return f"'{key}' is empty after text processing"
    return None


def _cause(err: BaseException, record) -> tuple[str, str]:
    """(kind for counting, one-line reason) of a failure."""
    if isinstance(err, _UnusableSample):
        return str(err), str(err)  # already free of paths and values: a kind of its own
    if isinstance(err, KeyError) and isinstance(record, dict) and err.args and err.args[0] not in record:
        return "missing key", f"the record has no key {err.args[0]!r}"
    if isinstance(err, Image.DecompressionBombWarning):
        return "decompression bomb", f"{type(err).__name__}: {err}"
    return type(err).__name__, f"{type(err).__name__}: {err}"


def _short(record):
    if record is None:
        return None
    text = repr(record)
    return text if len(text) <= _RECORD_TEXT_LIMIT else text[: _RECORD_TEXT_LIMIT - 3] + "..."


# ----------------------------------------------------------------------------- datasets of a run


def is_map_style(dataset) -> bool:
    return not isinstance(dataset, IterableDataset) and hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")


@dataclass(frozen=True)
class DataGuardSettings:
    """The ``run:`` keys of bad training samples."""

    bad_samples: str = setting(
        "skip", Choice(*POLICIES), "an unreadable training sample is replaced, counted and logged, or stops the run"
    )
    max_bad_sample_fraction: float = setting(
        DEFAULT_MAX_BAD_FRACTION, Number(0, 1), "more bad training samples than this fraction stop the run"
    )


def guard_datasets(datasets: dict, *, policy: str, train_splits, seed: int) -> dict:
    """Wrap every map-style dataset of LAVIS's ``{name: {split: dataset}}`` in ``GuardedDataset``.

    Training splits (``run.train_splits``) get ``policy`` (``run.bad_samples``), every other
    split ``error``; ``seed`` is ``run.seed``.  Webdataset pipelines and other iterable
    datasets are left as they are (they have their own ``handler``).  Wrap after the feature
    cache, whose builder reads images through the unwrapped dataset.
    """
    if policy not in POLICIES:
        raise ValueError(f"run.bad_samples must be one of {list(POLICIES)}, got {policy!r}")
    train_splits = set(train_splits)
    for name, by_split in datasets.items():
        for split, dataset in list(by_split.items()):
            if isinstance(dataset, GuardedDataset) or not is_map_style(dataset):
                continue
            by_split[split] = GuardedDataset(
                dataset,
                policy=policy if split in train_splits else "error",
                name=name,
                split=split,
                seed=seed,
                training=split in train_splits,
            )
    return datasets


def set_epoch(dataset, epoch: int) -> None:
    """``set_epoch`` on every ``GuardedDataset`` in ``dataset`` (itself, or inside Concat/Chain datasets)."""
    if isinstance(dataset, GuardedDataset):
        dataset.set_epoch(epoch)
    for inner in getattr(dataset, "datasets", None) or []:
        set_epoch(inner, epoch)


# ----------------------------------------------------------------------------- counting


class BadSampleTally:
    """Bad samples of the training loop: counted, logged once each, and a stop when too many.

    ``add(batch_size, batch["bad_samples"])`` every step; ``check()`` raises ``BadDataError``
    once at least ``min_seen`` samples were read (or at ``epoch_end``) and more than
    ``max_fraction`` of them were bad; ``summary()`` and ``reset()`` at the end of each epoch.
    In a distributed run ``all_reduce()`` (every rank calls it) gives the tally of all ranks,
    so every rank stops at the same step and rank 0 reports the global count.
    """

    def __init__(self, max_fraction: float = DEFAULT_MAX_BAD_FRACTION, min_seen: int = 100, keep: int = 20):
        if not 0 <= float(max_fraction) <= 1:
            raise ValueError(f"run.max_bad_sample_fraction must be in [0, 1], got {max_fraction!r}")
        self.max_fraction, self.min_seen, self.keep = float(max_fraction), int(min_seen), int(keep)
        self._logged: set = set()
        self.reset()

    def reset(self) -> None:
        """Start a new epoch's count (each bad sample is still logged only once per run)."""
        self.seen, self.bad = 0, 0
        self.kinds: Counter = Counter()
        self.reports: list[dict] = []

    def add(self, batch_size: int, reports) -> None:
        """A batch of ``batch_size`` good samples that replaced the bad ones in ``reports``.

        Every sample read counts as seen, the bad ones too, so the fraction is that of the reads.
        """
        reports = list(reports or [])
        self.seen += int(batch_size) + len(reports)
        self.bad += len(reports)
        for report in reports:
            self.kinds[report["kind"]] += 1
            if len(self.reports) < self.keep:
                self.reports.append(report)
            key = (report["dataset"], report["split"], report["index"])
            if key not in self._logged:
                self._logged.add(key)
                logger.warning("Bad sample skipped: %s", GuardedDataset.describe(report))

    @property
    def fraction(self) -> float:
        return self.bad / self.seen if self.seen else 0.0

    def check(self, max_fraction: float | None = None, epoch_end: bool = False) -> None:
        limit = self.max_fraction if max_fraction is None else float(max_fraction)
        if (self.seen >= self.min_seen or epoch_end) and self.fraction > limit:
            listing = "\n".join(f"  - {GuardedDataset.describe(report)}" for report in self.reports)
            more = f"\n  ... and {self.bad - len(self.reports)} more" if self.bad > len(self.reports) else ""
            raise BadDataError(
                f"{self.bad} of {self.seen} samples read ({self.fraction:.2%}) were bad, more than "
                f"run.max_bad_sample_fraction = {limit}:\n{listing}{more}\n"
                "Fix or remove these records, or raise run.max_bad_sample_fraction if that many are expected."
            )

    def summary(self) -> str:
        """One line for the epoch's log: counts by kind and the first few files."""
        if not self.bad:
            return f"bad samples: none of {self.seen} read"
        kinds = ", ".join(f"{count} {kind}" for kind, count in self.kinds.most_common())
        files = list(dict.fromkeys(r["file"] or f"{r['dataset']} {r['split']} #{r['index']}" for r in self.reports))
        shown = ", ".join(files[:5]) + (", ..." if len(files) > 5 or len(self.reports) < self.bad else "")
        return f"bad samples: {self.bad} of {self.seen} read ({self.fraction:.2%}), skipped: {kinds}; {shown}"

    def all_reduce(self) -> BadSampleTally:
        """The tally of every rank (this one when not distributed); a collective call.

        A new tally: this rank's own keeps counting its batches, so call it again for each check.
        """
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return self
        mine = (self.seen, self.bad, dict(self.kinds), self.reports)
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        total = BadSampleTally(self.max_fraction, self.min_seen, self.keep)
        total._logged = self._logged
        for seen, bad, kinds, reports in everyone:
            total.seen += seen
            total.bad += bad
            total.kinds.update(kinds)
            total.reports.extend(reports[: max(0, total.keep - len(total.reports))])
        return total
