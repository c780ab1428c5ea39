"""``python -m blip2_internlm.tools.caption``: captions (or VQA answers) for many images, to JSONL or CSV.

    python -m blip2_internlm.tools.caption photos/ --model-type tiny --checkpoint stage2.pth \\
        --lang zh --out captions.jsonl
    python -m blip2_internlm.tools.caption 'photos/**/*.jpg' list.txt --cfg-path configs/tiny/caption_eval.yaml \\
        --checkpoint stage2.pth --out captions.csv
    python -m blip2_internlm.tools.caption questions.jsonl --model-type tiny --checkpoint stage2.pth --out answers.jsonl

Inputs, in the order given (duplicates kept once):

* an image file; a folder (every image under it, recursively, sorted); a glob (sorted, ``**``
  recursive);
* a text list (``.txt``/``.lst``): one image path per line, ``#`` comments and blank lines skipped;
* a JSONL list (``.jsonl``): ``{"image": ..., "question": ...}`` per line, ``question`` optional;
* a LAVIS annotation JSON (``.json``): a list of records with ``image`` (caption annotations
  repeat an image per caption: it is captioned once) and, for VQA annotations, ``question``.

Relative paths in lists and annotations are read under ``--image-root`` (LAVIS's ``vis_root``),
else under the list's own folder; the output keeps them as written, with any ``image_id`` /
``question_id`` of the record.

Modes: captions with the model type's prompt, ``--lang``'s caption prompt or ``--prompt``; VQA
when ``--question`` is given or the inputs carry questions, answered by ``predict_answers`` with
``--lang``'s VQA prompt or ``--prompt`` (a template with ``{}``).  With ``--cfg-path`` the
config's ``run`` section gives the generation defaults (``num_beams``, ``max_len``, ``min_len``,
and ``prompt`` for VQA) and its dataset's eval text processor is applied to questions, as
``blip2_internlm.evaluate`` does.  An instruction model (``--arch blip2_internlm_instruct``) takes
``--instruction``: the user turn it answers for every image (in VQA a template with ``{}``).

The output has one row per image (per question in VQA) in input order: image, question,
prompt, text, error, and the settings that made it.  A rerun with the same output appends only
the images not yet in it (a partial last line, from a kill, is dropped first); an output file
that does not hold this command's rows is refused, untouched, before the model loads.  An image
that cannot be read (missing, truncated, not an image, not a regular file, or over
``--max-pixels``, PIL's decompression-bomb limit by default) is a row with ``error`` and is
counted in the summary line, never the end of the run.  The exit status is non-zero only for a
usage error or a model that cannot be built.

Under ``python -m torch.distributed.run --nproc_per_node=N -m blip2_internlm.tools.caption ...`` each
rank captions its own share of the images on its own device (``cuda:LOCAL_RANK``, or the CPU), and
rank 0 alone writes ``--out``: the file the same command writes in one process, row for row.  See
:func:`run` for how the shares are dealt and why resuming still holds.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import fnmatch
import glob
import io
import json
import os
import stat
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
LIST_EXTENSIONS = frozenset({".txt", ".lst"})
#: Record keys carried from an input record to its output row, for joining results back.
CARRIED_KEYS = ("image_id", "question_id")
CSV_COLUMNS = ("image", "image_id", "question_id", "question", "prompt", "text", "error", "settings")
#: The keys of an output row: those a JSONL row always has, and all it may have.
REQUIRED_ROW_KEYS, ROW_KEYS = frozenset({"image", "prompt", "text", "settings"}), frozenset(CSV_COLUMNS)
#: How every JSONL row begins: a last line cut short by a kill still begins so (or is a prefix of it).
JSONL_ROW_START = b'{"image": '
#: Images whose header claims more pixels are error rows, never decoded: PIL's default
#: ``Image.MAX_IMAGE_PIXELS`` (about 9459 x 9459; 256 MiB as RGB), its decompression-bomb limit.
DEFAULT_MAX_PIXELS = 1024 * 1024 * 1024 // 4 // 3
#: Images per batch and DataLoader workers unless told otherwise.
BATCH_SIZE, WORKERS = 8, 2
#: How long a rank waits for the others (the longest a batch may take on the slowest rank) before it gives up.
DIST_TIMEOUT_MINUTES = 30.0
#: LAVIS's defaults: ``Blip2*.generate`` for captions, ``predict_answers`` / ``VQATask`` for answers.
DEFAULTS = {
    "caption": {"num_beams": 5, "max_len": 30, "min_len": 1},
    "vqa": {"num_beams": 5, "max_len": 10, "min_len": 1},
}


class UsageError(ValueError):
    """Bad arguments or inputs; the message names the file, line or record."""


# --- ranks --------------------------------------------------------------------------------------


class RankFailure(RuntimeError):
    """A rank's batch failed, or a rank exited or stopped answering: every rank stops (the output keeps what
    is written).  ``reported``: the ranks learnt it from each other, so all of them are still there."""

    def __init__(self, message: str, reported: bool):
        super().__init__(message)
        self.reported = reported


@dataclass(frozen=True)
class Ranks:
    """This process among ``torch.distributed.run``'s ranks; one process is rank 0 of 1, with no process group.

    The ranks exchange Python objects only (the inputs, the rows of text), through a gloo group on CPUs and
    GPUs alike: no tensor crosses between ranks, so NCCL would bring nothing.  Every exchange waits at most
    ``timeout_minutes`` for a rank that stopped answering; one that exited is noticed at once."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    timeout_minutes: float = DIST_TIMEOUT_MINUTES

    @classmethod
    def from_environment(cls, timeout_minutes: float = DIST_TIMEOUT_MINUTES) -> Ranks:
        """torchrun's ranks (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``), or one process."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls(timeout_minutes=timeout_minutes)
        ranks = cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")), timeout_minutes)
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=timeout_minutes))
        return ranks

    @property
    def main(self) -> bool:
        """Whether this rank writes the output and prints."""
        return self.rank == 0

    def share(self, value):
        """Rank 0's ``value``, on every rank."""
        if self.world == 1:
            return value
        box = [value]
        self._exchange(dist.broadcast_object_list, box, src=0)
        return box[0]

    def from_main(self, compute: Callable[[], object], errors: tuple[type[Exception], ...] = (UsageError,)):
        """``compute()`` run on rank 0 alone, its result on every rank; when it raises one of ``errors``, rank 0
        raises that error and every other rank a :class:`UsageError` with its message (none is left waiting)."""
        outcome = failure = None
        if self.main:
            try:
                outcome = (True, compute())
            except errors as err:
                failure, outcome = err, (False, str(err))
        ok, value = self.share(outcome)
        if failure is not None:
            raise failure
        if not ok:
            raise UsageError(value)
        return value

    def gather(self, value) -> list:
        """Every rank's ``value``, in rank order, on every rank."""
        if self.world == 1:
            return [value]
        values = [None] * self.world
        self._exchange(dist.all_gather_object, values, value)
        return values

    def _exchange(self, collective, *args, **kwargs) -> None:
        try:
            collective(*args, **kwargs)
        except RuntimeError as err:  # gloo's timeout, or a peer whose process ended
            reason = " ".join(str(err).split())[:300]
            raise RankFailure(
                f"rank {self.rank}: the other ranks did not answer within {self.timeout_minutes:g} minutes "
                f"(--dist-timeout-minutes) or one of them exited ({reason})",
                reported=False,
            ) from None

    def leave_together(self) -> None:
        """Wait until every rank is here, if they all still are: torchrun stops the others when one exits,
        which could cut rank 0 short before it reports."""
        try:
            self.gather(None)
        except RankFailure:
            pass

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


# --- inputs -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One image (and question) to run: ``image`` as the output shows it, ``path`` the file read."""

    image: str
    path: str
    question: str | None = None
    carried: tuple = ()

    @property
    def key(self) -> tuple:
        return (self.image, self.question)


def is_image_file(path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def collect_items(inputs, image_root=None, question: str | None = None) -> list[Item]:
    """The items of ``inputs`` in order, each (image file, question) once, as first named;
    ``question`` goes to every item that has none of its own."""
    items: dict[tuple, Item] = {}
    for source in inputs:
        for item in _expand(str(source), image_root):
            if item.question is None and question is not None:
                item = Item(item.image, item.path, question, item.carried)
            items.setdefault((os.path.realpath(item.path), item.question), item)
    return list(items.values())


def _expand(source: str, image_root):
    path = Path(source)
    if path.is_dir():
        found = sorted(str(p) for p in path.rglob("*") if p.is_file() and is_image_file(p))
        if not found:
            raise UsageError(f"{source}: no image files under this folder (extensions {sorted(IMAGE_EXTENSIONS)})")
        return [Item(p, p) for p in found]
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in LIST_EXTENSIONS:
            return _text_list(path, image_root)
        if suffix == ".jsonl":
            return _jsonl_list(path, image_root)
        if suffix == ".json":
            return _annotation_json(path, image_root)
        return [Item(source, source)]  # named explicitly: an image, whatever its extension
    if glob.has_magic(source):
        found = sorted(p for p in glob_paths(source) if os.path.isfile(p) and is_image_file(p))
        if not found:
            raise UsageError(f"{source}: the pattern matches no image files")
        return [Item(p, p) for p in found]
    raise UsageError(f"{source}: no such file or folder")


def glob_paths(pattern: str) -> list[str]:
    """What ``glob.glob(pattern, recursive=True)`` finds, except that ``**`` does not enter symlinked
    folders (as a folder input does not): glob.glob follows them, and two links back to a parent
    folder make its walk exponential, a run that never starts.  Hidden names match only a pattern
    part that starts with a dot, as in glob.glob."""
    pieces = pattern.split(os.sep)
    literal = next(index for index, piece in enumerate(pieces) if glob.has_magic(piece))
    prefix = os.sep.join(pieces[:literal]) or (os.sep if literal else "")
    magic = pieces[literal:] + (["*"] if pieces[-1] == "**" else [])  # glob's trailing ** also lists files
    dotted = [piece for piece in magic if piece.startswith(".")]
    found = []
    for path in Path(prefix or ".").glob(os.sep.join(magic)):
        names = path.relative_to(prefix or ".").parts
        if all(not name.startswith(".") or any(fnmatch.fnmatchcase(name, p) for p in dotted) for name in names):
            found.append(os.path.join(prefix, *names) if prefix else os.path.join(*names))
    return found


def _under(root, list_file: Path, image: str) -> str:
    return image if os.path.isabs(image) else os.path.join(root if root is not None else list_file.parent, image)


def _text_list(path: Path, image_root):
    items = []
    for line in path.read_text(encoding="utf-8").splitlines():
        image = line.strip()
        if image and not image.startswith("#"):
            items.append(Item(image, _under(image_root, path, image)))
    if not items:
        raise UsageError(f"{path}: lists no images")
    return items


def _record_item(record, where: str, list_file: Path, image_root) -> Item:
    if not isinstance(record, dict):
        raise UsageError(f"{where}: expected an object with 'image', got {type(record).__name__}")
    image = record.get("image")
    if not isinstance(image, str) or not image:
        raise UsageError(f"{where}: no 'image' path")
    question = record.get("question")
    if question is not None and (not isinstance(question, str) or not question.strip()):
        raise UsageError(f"{where}: 'question' must be a non-empty string")
    carried = tuple((key, record[key]) for key in CARRIED_KEYS if key in record)
    return Item(image, _under(image_root, list_file, image), question, carried)


def _jsonl_list(path: Path, image_root):
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UsageError(f"{path}, line {number}: not JSON ({err.msg})") from None
        items.append(_record_item(record, f"{path}, line {number}", path, image_root))
    if not items:
        raise UsageError(f"{path}: lists no images")
    return items


def _annotation_json(path: Path, image_root):
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UsageError(f"{path}: not JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(records, list) or not records:
        raise UsageError(f"{path}: expected a LAVIS annotation file, a non-empty list of records with 'image'")
    return [_record_item(record, f"{path}, record {index}", path, image_root) for index, record in enumerate(records)]


# --- decoding, in DataLoader workers -----------------------------------------------------------


class ImageTooLarge(ValueError):
    """An image whose header claims more pixels than the limit: a decompression bomb, or just too big."""


#: What a path that is not a regular file is, for its error row (opening a named pipe would wait forever).
NOT_A_FILE = {
    stat.S_ISDIR: "a folder",
    stat.S_ISFIFO: "a named pipe",
    stat.S_ISCHR: "a device",
    stat.S_ISBLK: "a device",
    stat.S_ISSOCK: "a socket",
}


def read_rgb(path, max_pixels: int = DEFAULT_MAX_PIXELS):
    """The RGB picture in ``path``.

    Raises ``OSError`` for what is not a regular file or not an image, ``ImageTooLarge`` when the
    header claims more than ``max_pixels`` pixels (before any pixel is decoded), and whatever a
    decoder raises for a damaged file.  PIL's own bomb check is off while the header is read,
    because it raises only above twice its limit, merely warns below, and never names the size;
    the limit here is checked instead (the switch is process-wide for that moment: this runs in
    DataLoader workers, or in the command's one thread with ``--workers 0``)."""
    from PIL import Image

    mode = os.stat(path).st_mode
    kind = next((name for test, name in NOT_A_FILE.items() if test(mode)), None)
    if kind is not None:
        raise OSError(f"not an image file but {kind}")
    pil_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        image = Image.open(path)
    finally:
        Image.MAX_IMAGE_PIXELS = pil_limit
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise ImageTooLarge(
                f"image too large: {width} x {height} = {width * height} pixels, limit {max_pixels} (--max-pixels)"
            )
        # PIL decodes lazily: convert() reads the whole file, so a truncated one fails here
        # (blip2_internlm.compat turns off LAVIS's LOAD_TRUNCATED_IMAGES, which would pad it grey)
        return image.convert("RGB")


class ImageFiles(torch.utils.data.Dataset):
    """``(index, image tensor or None, error or None)``: a file that cannot be read or processed
    is an error string, so one bad image never stops the loader."""

    def __init__(self, items: list[Item], vis_processor, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.items, self.vis_processor, self.max_pixels = items, vis_processor, max_pixels

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        item = self.items[index]
        try:
            picture = read_rgb(item.path, self.max_pixels)
        except ImageTooLarge as err:
            return index, None, str(err)
        except (OSError, ValueError) as err:
            return index, None, " ".join(f"cannot decode image: {err}".split())
        except Exception as err:  # noqa: BLE001  (any decoder failure is this image's error, not the run's)
            return index, None, " ".join(f"cannot decode image: {type(err).__name__}: {err}".split())
        try:
            return index, self.vis_processor(picture), None
        except Exception as err:  # noqa: BLE001  (a processor failure is this image's error, not the run's)
            return index, None, " ".join(f"cannot process image: {type(err).__name__}: {err}".split())


def collate(samples):
    """``(indices, stacked images of the readable ones or None, errors in index order)``."""
    images = [image for _, image, _ in samples if image is not None]
    return (
        [index for index, _, _ in samples],
        (torch.stack(images) if images else None),
        [error for _, _, error in samples],
    )


# --- generation --------------------------------------------------------------------------------


@dataclass
class GenerationSettings:
    """What runs on a batch, and the settings every output row records."""

    mode: str  # caption | vqa
    prompt: str
    num_beams: int
    max_len: int
    min_len: int
    sample: bool = False
    top_p: float | None = None
    temperature: float | None = None
    repetition_penalty: float | None = None
    length_penalty: float | None = None
    model: dict = field(default_factory=dict)

    def __call__(self, model, images: torch.Tensor, questions: list) -> list[str]:
        if self.mode == "vqa":
            extra = {} if self.length_penalty is None else {"length_penalty": self.length_penalty}
            return model.predict_answers(
                {"image": images, "text_input": questions},
                num_beams=self.num_beams,
                max_len=self.max_len,
                min_len=self.min_len,
                prompt=self.prompt,
                **extra,
            )
        optional = {
            "top_p": self.top_p,
            "temperature": self.temperature,
            "repetition_penalty": self.repetition_penalty,
            "length_penalty": self.length_penalty,
        }
        return model.generate(
            {"image": images, "prompt": self.prompt},
            use_nucleus_sampling=self.sample,
            num_beams=self.num_beams,
            max_length=self.max_len,
            min_length=self.min_len,
            **{key: value for key, value in optional.items() if value is not None},
        )

    def settings(self) -> dict:
        return {key: value for key, value in asdict(self).items() if key != "prompt" and value is not None}


# --- output ------------------------------------------------------------------------------------


def output_format(path, requested: str | None) -> str:
    if requested:
        return requested
    return "csv" if str(path).lower().endswith(".csv") else "jsonl"


class ForeignOutput(UsageError):
    """``--out`` exists but does not hold this command's rows: it is left as it is."""

    def __init__(self, path, why: str):
        super().__init__(
            f"{path}: not an output of this command ({why}); left as it is: "
            "give another --out, or delete the file to start over"
        )


def read_output(path: Path, fmt: str) -> tuple[list[tuple[int, dict]], int]:
    """``([(line number, row)], bytes of whole lines)`` of an existing output, changing nothing.

    Raises ``ForeignOutput`` unless every whole line is a row of this command (JSONL: an object
    with its keys; CSV: its header, then rows of its cells) and a last line without a newline
    is the start of one, as a kill during a write leaves it."""
    if not path.exists():
        return [], 0
    if path.is_dir():
        raise UsageError(f"{path}: --out is a folder; give a file")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UsageError(f"{path}: cannot read --out ({err.strerror or err})") from None
    whole = data.rfind(b"\n") + 1
    try:
        text = data[:whole].decode("utf-8")
    except UnicodeDecodeError:
        raise ForeignOutput(path, "it is not UTF-8 text") from None
    rows = _csv_rows(path, text) if fmt == "csv" else _jsonl_rows(path, text)
    cut = data[whole:]
    if cut and not _is_cut_row(cut, fmt, has_header=bool(text)):
        last = text.count("\n") + 1
        raise ForeignOutput(path, f"its last line, line {last}, has no newline and is not the start of a row")
    return rows, whole


def _is_cut_row(cut: bytes, fmt: str, has_header: bool) -> bool:
    """Whether ``cut``, a last line without its newline, is what a kill leaves of a row this command wrote."""
    if fmt == "csv":  # a data row has nothing to recognise it by but the header above it
        header = RowWriter.csv_line(dict(zip(CSV_COLUMNS, CSV_COLUMNS))).encode()
        return has_header or header.startswith(cut)
    try:
        return _row_problem(json.loads(cut)) is None  # whole but for its newline: one of ours, or not
    except (json.JSONDecodeError, UnicodeDecodeError):
        return cut.startswith(JSONL_ROW_START) or JSONL_ROW_START.startswith(cut)


def _row_problem(row) -> str | None:
    """Why ``row`` is not one this command writes, or None."""
    if not isinstance(row, dict):
        return f"a JSON {type(row).__name__}, not a row"
    missing, foreign = sorted(REQUIRED_ROW_KEYS - row.keys()), sorted(row.keys() - ROW_KEYS)
    if missing:
        return "no " + ", ".join(map(repr, missing))
    if foreign:
        return "keys it never writes: " + ", ".join(map(repr, foreign))
    if not isinstance(row["image"], str) or not isinstance(row["settings"], dict):
        return "'image' is not text or 'settings' not an object"
    return None


def _jsonl_rows(path, text: str) -> list[tuple[int, dict]]:
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ForeignOutput(path, f"line {number} is not JSON: {err.msg}") from None
        problem = _row_problem(row)
        if problem:
            raise ForeignOutput(path, f"line {number} is not a row: {problem}")
        rows.append((number, row))
    return rows


def _csv_rows(path, text: str) -> list[tuple[int, dict]]:
    if not text:
        return []
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if tuple(reader.fieldnames or ()) != CSV_COLUMNS:
        raise ForeignOutput(path, f"its header is {reader.fieldnames}, not {list(CSV_COLUMNS)}")
    rows = []
    for row in _csv_records(path, reader):
        number = reader.line_num
        if None in row or None in row.values():
            raise ForeignOutput(path, f"line {number} does not have the {len(CSV_COLUMNS)} cells of a row")
        try:
            settings = json.loads(row["settings"])
        except json.JSONDecodeError:
            settings = None
        if not isinstance(settings, dict):
            raise ForeignOutput(path, f"line {number}: its settings cell is not a JSON object")
        rows.append((number, {**row, "settings": settings}))
    return rows


def _csv_records(path, reader):
    try:
        yield from reader
    except csv.Error as err:
        raise ForeignOutput(path, f"line {reader.line_num} is not CSV: {err}") from None


def read_done(path: Path, fmt: str, settings: dict, prompt: str) -> set[tuple]:
    """Keys of the rows already in ``path``; a partial last line, which a kill leaves, is cut off.

    The file is checked before anything is cut: one that is not this command's output
    (``ForeignOutput``) or holds rows made with another prompt or other settings is refused and
    left as it was: one file holds one run's results."""
    rows, whole = read_output(path, fmt)
    done = set()
    for number, row in rows:
        if row.get("settings") != settings or row.get("prompt") != prompt:
            raise UsageError(
                f"{path}, line {number} was made with other settings (prompt {row.get('prompt')!r}, "
                f"{row.get('settings')}; now prompt {prompt!r}, {settings}): "
                "write to another file, or delete it to start over"
            )
        done.add((row["image"], row.get("question") or None))
    if path.is_file() and path.stat().st_size > whole:
        with open(path, "r+b") as handle:
            handle.truncate(whole)
    return done


class RowWriter:
    """Appends rows and flushes each batch: what a kill leaves behind is whole lines, plus at
    most one partial line that the next run cuts off."""

    def __init__(self, path: Path, fmt: str):
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.is_file() or path.stat().st_size == 0
        self.fmt = fmt
        self.file = open(path, "a", encoding="utf-8", newline="")  # noqa: SIM115  (closed by close() / the with block)
        if fmt == "csv" and new:
            self.file.write(self.csv_line(dict(zip(CSV_COLUMNS, CSV_COLUMNS))))

    @staticmethod
    def csv_line(row: dict) -> str:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerow(["" if row.get(k) is None else row[k] for k in CSV_COLUMNS])
        return buffer.getvalue()

    def write(self, rows: list[dict]) -> None:
        if self.fmt == "csv":
            lines = [
                self.csv_line({**row, "settings": json.dumps(row["settings"], ensure_ascii=False, sort_keys=True)})
                for row in rows
            ]
        else:
            lines = [json.dumps(row, ensure_ascii=False) + "\n" for row in rows]
        self.file.write("".join(lines))  # one write per batch
        self.file.flush()

    def close(self) -> None:
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def output_row(item: Item, generation: GenerationSettings, text=None, error=None) -> dict:
    row = {"image": item.image, **dict(item.carried)}
    if item.question is not None:
        row["question"] = item.question
    row["prompt"] = generation.prompt
    row["text"] = text
    if error is not None:
        row["error"] = error
    row["settings"] = generation.settings()
    return row


# --- the loop ----------------------------------------------------------------------------------


@dataclass
class Summary:
    total: int
    already_done: int = 0
    written: int = 0
    errors: int = 0
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.written / self.seconds if self.seconds else 0.0

    def line(self, output) -> str:
        return (
            f"{output}: {self.written} written ({self.written - self.errors} ok, {self.errors} unreadable), "
            f"{self.already_done} already there, {self.total} inputs; {self.images_per_s:.2f} images/s"
        )


def run(
    model,
    vis_processor,
    items: list[Item],
    output,
    generation: GenerationSettings,
    *,
    fmt: str | None = None,
    batch_size: int = BATCH_SIZE,
    workers: int = WORKERS,
    question_processor=None,
    progress: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    ranks: Ranks | None = None,
) -> Summary:
    """Run ``generation`` over ``items`` not yet in ``output`` and append their rows, in input order;
    an image over ``max_pixels`` pixels is an error row.

    With several ``ranks`` (every rank calls this with the same arguments but its own model): rank 0
    reads the output and decides what is left, cut into the batches one process would run; batch ``j``
    goes to rank ``j % world``.  Each round, every rank runs its next batch and the rows go to every
    rank; rank 0 appends them in batch order.  So the file grows exactly as one process's would, a whole
    round at a time, and a kill leaves a prefix of it (plus a partial line) that any number of ranks
    resumes.  A rank whose batch raises prints its traceback and sends the error instead of rows: rank 0
    writes the batches before it, and every rank raises ``RankFailure`` naming the rank, the images and
    the error (one process raises the error itself, as it always did)."""
    ranks = ranks or Ranks()
    output = Path(output)
    fmt = output_format(output, fmt)
    writer = None

    def left_to_do() -> list[int]:  # rank 0: what the output lacks, and the writer that appends it
        nonlocal writer
        done = read_done(output, fmt, generation.settings(), generation.prompt)
        left = [index for index, item in enumerate(items) if item.key not in done]
        writer = _open_writer(output, fmt) if left else None
        return left

    todo = [items[index] for index in ranks.from_main(left_to_do)]
    summary = Summary(total=len(items), already_done=len(items) - len(todo))
    if not todo:
        return summary
    device = next(model.parameters()).device
    batches = [range(first, min(first + batch_size, len(todo))) for first in range(0, len(todo), batch_size)]
    mine = [index for batch in batches[ranks.rank :: ranks.world] for index in batch]  # todo indices, in order
    loader = torch.utils.data.DataLoader(  # the same batches: all of mine are full but the last of all
        ImageFiles([todo[index] for index in mine], vis_processor, max_pixels),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
    )
    my_batches = iter(loader)
    start = time.perf_counter()
    with writer or nullcontext(), _progress_bar(len(todo), progress and ranks.main) as bar:
        for first_batch in range(0, len(batches), ranks.world):
            rows = failure = None  # no batch for this rank in an uneven last round
            if first_batch + ranks.rank < len(batches):
                try:
                    indices, images, errors = next(my_batches)
                    here = [todo[mine[index]] for index in indices]
                    rows = caption_batch(model, generation, here, images, errors, device, question_processor)
                except Exception as err:  # noqa: BLE001  (every rank stops on it, below)
                    if ranks.world == 1:
                        raise
                    traceback.print_exc()  # now: torchrun may stop this process once another one exits
                    failure, rows = err, " ".join(f"{type(err).__name__}: {err}".split())
            outcomes = ranks.gather(rows)
            failed = next((rank for rank, outcome in enumerate(outcomes) if isinstance(outcome, str)), None)
            written = [row for outcome in outcomes[:failed] if outcome for row in outcome]
            if writer is not None and written:
                writer.write(written)
            summary.written += len(written)
            summary.errors += sum("error" in row for row in written)
            summary.seconds = time.perf_counter() - start
            bar.update(len(written))
            bar.set_postfix(unreadable=summary.errors, refresh=False)
            if failed is not None:
                batch = batches[first_batch + failed]
                raise RankFailure(
                    f"rank {failed}: the batch of {len(batch)} images from {todo[batch[0]].image} on failed: "
                    f"{outcomes[failed]}; {output} holds the rows before them: run the command again to resume",
                    reported=True,
                ) from failure
    return summary


def caption_batch(model, generation, items: list[Item], images, errors, device, question_processor=None) -> list:
    """The output rows of one loader batch (``items`` and the loader's images and errors)."""
    readable = [position for position, error in enumerate(errors) if error is None]
    texts = {}
    if readable:
        questions = [items[position].question for position in readable]
        if question_processor is not None:
            questions = [question_processor(question) for question in questions]
        texts = dict(zip(readable, generation(model, images.to(device, non_blocking=True), questions)))
    return [
        output_row(item, generation, texts.get(position), error)
        for position, (item, error) in enumerate(zip(items, errors))
    ]


def _open_writer(output: Path, fmt: str) -> RowWriter:
    try:
        return RowWriter(output, fmt)
    except OSError as err:
        raise UsageError(f"{output}: cannot write --out ({err.strerror or err})") from None


def _progress_bar(total: int, enabled: bool):
    """tqdm on stderr (images/s as it goes), or nothing: the summary line reports the rate."""
    from tqdm import tqdm

    return tqdm(total=total, unit="img", file=sys.stderr, dynamic_ncols=True, smoothing=0.1, disable=not enabled)


# --- command line ------------------------------------------------------------------------------


def parse_args(argv=None):
    from blip2_internlm.tiny.pretrain_text import CAPTION_PROMPTS

    parser = argparse.ArgumentParser(
        prog="python -m blip2_internlm.tools.caption",
        description=__doc__.split("\n")[0],
        epilog=__doc__.split("\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "inputs", nargs="+", help="image files, folders, globs, .txt/.jsonl lists, LAVIS annotation .json"
    )
    parser.add_argument(
        "--out", required=True, type=Path, help="output file (.jsonl or .csv); an existing one is resumed"
    )
    parser.add_argument(
        "--format", choices=("jsonl", "csv"), help="default: from --out's extension (jsonl unless .csv)"
    )
    parser.add_argument("--image-root", help="folder that relative paths in lists and annotations are under")
    model = parser.add_argument_group("model")
    source = model.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-type", help="a model type of --arch (tiny, pretrain_internlm2_1.8b, ...)")
    source.add_argument(
        "--cfg-path", help="a training/evaluation YAML: its model section, eval processors and run settings"
    )
    model.add_argument(
        "--arch", default=None, help="registered model (default blip2_internlm; with --cfg-path its model.arch)"
    )
    model.add_argument("--checkpoint", help="stage-2 or fine-tuned checkpoint (.pth / .safetensors)")
    model.add_argument(
        "--options",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="model-config keys, e.g. llm_model=/path/to/internlm2-1_8b vit_weights=... (a model. prefix is allowed)",
    )
    model.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    mode = parser.add_argument_group("prompt and mode")
    mode.add_argument(
        "--lang", choices=sorted(CAPTION_PROMPTS), help="the demo's caption / VQA prompt of this language"
    )
    mode.add_argument("--prompt", help="caption prompt, or in VQA a template with {} for the question")
    mode.add_argument("--question", help="VQA: ask this of every image without a question of its own")
    mode.add_argument(
        "--instruction",
        help="an instruction model (blip2_internlm_instruct): what to ask of every image, e.g. "
        "'Describe this image in detail.'; with questions, a template with {} for the question",
    )
    gen = parser.add_argument_group("generation")
    gen.add_argument("--num-beams", type=int, help="default 5, or the --cfg-path config's run.num_beams")
    gen.add_argument("--max-len", type=int, help="new tokens at most (default 30 for captions, 10 for answers)")
    gen.add_argument("--min-len", type=int, help="new tokens at least (default 1)")
    gen.add_argument("--sample", action="store_true", help="nucleus sampling instead of beam search (captions only)")
    gen.add_argument("--top-p", type=float, help="with --sample (default 0.9)")
    gen.add_argument("--temperature", type=float, help="with --sample (default 1)")
    gen.add_argument("--repetition-penalty", type=float, help="captions only (default 1.0)")
    gen.add_argument(
        "--length-penalty", type=float, help="beam search length penalty (default 1.0 captions, 0 answers)"
    )
    gen.add_argument("--seed", type=int, default=0, help="torch seed, for --sample")
    run_group = parser.add_argument_group("running")
    run_group.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    run_group.add_argument(
        "--workers", type=int, default=WORKERS, help="DataLoader workers decoding images (0: in this process)"
    )
    run_group.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="an image whose header claims more pixels is an error row, never decoded "
        f"(default {DEFAULT_MAX_PIXELS}, PIL's decompression-bomb limit)",
    )
    run_group.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    run_group.add_argument(
        "--dist-timeout-minutes",
        type=float,
        default=DIST_TIMEOUT_MINUTES,
        help="under torchrun: how long a rank waits for the others before it stops with an error "
        f"(default {DIST_TIMEOUT_MINUTES:g}; more than the slowest batch takes)",
    )
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.workers < 0 or args.max_pixels < 1:
        parser.error("--batch-size and --max-pixels must be >= 1 and --workers >= 0")
    if not args.dist_timeout_minutes > 0:
        parser.error("--dist-timeout-minutes must be > 0")
    if not args.sample and (args.top_p is not None or args.temperature is not None):
        parser.error("--top-p and --temperature apply with --sample")
    if args.sample and args.num_beams not in (None, 1):
        parser.error("--num-beams with --sample: nucleus sampling draws one sequence per image, no beams")
    return parser, args


def mode_of(args, items: list[Item]) -> str:
    """``vqa`` when the items carry questions, else ``caption``; flags that do not fit are errors."""
    asked = [item for item in items if item.question is not None]
    if asked and len(asked) != len(items):
        missing = next(item for item in items if item.question is None)
        raise UsageError(
            f"{missing.image} has no question while other inputs have one: give --question for it, "
            "or run captions and answers separately"
        )
    if asked and (args.sample or args.repetition_penalty is not None):
        raise UsageError("--sample and --repetition-penalty apply to captions; predict_answers searches beams")
    return "vqa" if asked else "caption"


def generation_for(args, items: list[Item], model, run_cfg) -> GenerationSettings:
    from omegaconf import OmegaConf

    from blip2_internlm.factory import DEFAULT_ARCH
    from blip2_internlm.tiny.pretrain_text import CAPTION_PROMPTS, VQA_PROMPTS

    mode = mode_of(args, items)
    if args.instruction is not None:
        if not hasattr(model, "chat"):
            raise UsageError(
                f"--instruction needs an instruction model (--arch blip2_internlm_instruct); {type(model).__name__} "
                "takes --prompt"
            )
        if args.prompt is not None:
            raise UsageError("give --instruction or --prompt, not both")
        if not args.instruction.strip():
            raise UsageError("--instruction is empty")
        args.prompt = args.instruction
    if mode == "vqa":
        prompt = args.prompt or (VQA_PROMPTS[args.lang] if args.lang else run_cfg.get("prompt") or VQA_PROMPTS["en"])
    else:
        prompt = args.prompt if args.prompt is not None else CAPTION_PROMPTS[args.lang] if args.lang else model.prompt
    settings = {key: run_cfg.get(key, default) for key, default in DEFAULTS[mode].items()}
    for key in settings:
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if args.sample:
        settings["num_beams"] = 1  # what generate runs with when it samples; the rows say so
    sampling = (
        {
            "top_p": 0.9 if args.top_p is None else args.top_p,
            "temperature": 1.0 if args.temperature is None else args.temperature,
        }
        if args.sample
        else {}
    )
    arch = args.arch or (
        OmegaConf.select(OmegaConf.load(args.cfg_path), "model.arch") if args.cfg_path else DEFAULT_ARCH
    )
    described = {
        "arch": arch,
        "model_type": args.model_type,
        "cfg_path": args.cfg_path,
        "checkpoint": args.checkpoint,
        "options": args.options or None,
    }
    return GenerationSettings(
        mode=mode,
        prompt=prompt,
        sample=args.sample,
        repetition_penalty=args.repetition_penalty,
        length_penalty=args.length_penalty,
        model={k: v for k, v in described.items() if v is not None},
        **settings,
        **sampling,
    )


def main(argv=None) -> int:
    parser, args = parse_args(argv)
    ranks = Ranks.from_environment(args.dist_timeout_minutes)
    try:
        return _main(parser, args, ranks)
    except RankFailure as err:
        if ranks.main:
            print(f"error: {err}", file=sys.stderr, flush=True)
        if err.reported:
            ranks.leave_together()
        return 1
    finally:
        ranks.close()


def _main(parser, args, ranks: Ranks) -> int:
    from omegaconf import OmegaConf

    import blip2_internlm  # noqa: F401  (compat fixes, registration)
    from blip2_internlm.checkpoint import CheckpointError
    from blip2_internlm.factory import ModelOptionError, parse_model_options
    from blip2_internlm.inference import load_model_and_preprocess

    def usage_error(message: str):
        if ranks.main:
            parser.error(message)  # exits 2
        raise SystemExit(2)  # rank 0 says why

    def checked_inputs() -> list[Item]:  # rank 0: the one list every rank runs (a folder listed twice could differ)
        items = collect_items(args.inputs, args.image_root, args.question)
        mode_of(args, items)  # before the model loads, which can take minutes
        read_output(args.out, output_format(args.out, args.format))  # so is a foreign --out (its settings: later)
        return items

    try:
        items = ranks.from_main(checked_inputs, errors=(UsageError, OSError))
    except (UsageError, OSError) as err:
        usage_error(str(err))
    try:
        options = parse_model_options(args.options)
    except ModelOptionError as err:
        usage_error(str(err))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda":
        if not torch.cuda.is_available():
            usage_error(f"--device {device}: no CUDA device visible")
        if ranks.world > 1 and torch.device(device).index is None:  # one device per rank
            if ranks.local_rank >= torch.cuda.device_count():
                usage_error(f"LOCAL_RANK {ranks.local_rank} but {torch.cuda.device_count()} CUDA devices visible")
            device = f"cuda:{ranks.local_rank}"
        if torch.device(device).index is not None:
            torch.cuda.set_device(torch.device(device))
    problem = None
    torch.manual_seed(args.seed)  # what no file sets (a model type without weights) is the same on every rank
    try:
        model, vis_processors, txt_processors = load_model_and_preprocess(
            args.arch,
            args.model_type,
            is_eval=True,
            device=device,
            checkpoint=args.checkpoint,
            cfg_path=args.cfg_path,
            **options,
        )
    except (OSError, ValueError, CheckpointError) as err:
        problem = f"no model: {err}"
    problems = ranks.gather(problem)
    if any(problems):
        if ranks.main:
            rank, problem = next((rank, problem) for rank, problem in enumerate(problems) if problem)
            print(f"error: {problem}" + (f" (rank {rank})" if ranks.world > 1 else ""), file=sys.stderr)
        return 2
    run_cfg = (OmegaConf.load(args.cfg_path).get("run") or {}) if args.cfg_path else {}
    try:
        generation = generation_for(args, items, model, run_cfg)
        torch.manual_seed(args.seed)
        summary = run(
            model,
            vis_processors["eval"],
            items,
            args.out,
            generation,
            fmt=args.format,
            batch_size=args.batch_size,
            workers=args.workers,
            question_processor=txt_processors["eval"] if args.cfg_path and generation.mode == "vqa" else None,
            progress=not args.no_progress,
            max_pixels=args.max_pixels,
            ranks=ranks,
        )
    except UsageError as err:
        usage_error(str(err))
    if ranks.main:
        print(summary.line(args.out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
