"""Web demo: ``python -m blip2_internlm.tools.app --model-type tiny --checkpoint stage2.pth`` (Streamlit).

Upload an image or pick a sample, read its caption in Chinese or English, ask a question;
beam size, nucleus sampling (top-p, seed) and maximum lengths are controls, and every result
shows how long the model took.  ``--from-demo output/demo`` (``make app``) serves the model
``make demo`` trained, with held-out images of its synthetic data as samples.

The command validates its arguments, then runs ``streamlit run`` on this same file; Streamlit
executes the file again as a script (:func:`page`) on every interaction, so the model is built
once per server process (``st.cache_resource``) and every generation runs under
``torch.inference_mode()``.  Streamlit rather than Gradio: docs/app.md.

The page is meant to survive being public: uploads are capped in bytes and pixels and decoded only
from an allow-list of formats, prompts and questions are capped in length and never interpreted
as format strings, and generations wait in a bounded queue with a timeout; each refusal is a
message in the page (docs/app.md, "Limits").
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import hashlib
import io
import json
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
LANGUAGES = {"zh": "中文", "en": "English"}
#: Held-out images shown as samples (the generated shapes data, or --samples).
MAX_SAMPLES = 48
#: The Pillow decoders an image may be read with, whatever its name says (GIF and WebP: the first frame).
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
MEBIBYTE = 1024 * 1024  # Streamlit's "MB" in server.maxUploadSize


# --- what the page accepts --------------------------------------------------------------


@dataclass(frozen=True)
class PageLimits:
    """What one request may bring: the defaults are the command's flags' (docs/app.md, "Limits")."""

    max_upload_mb: int = 20
    max_image_pixels: int = 25_000_000
    max_prompt_chars: int = 500
    max_question_chars: int = 500


class Refused(ValueError):
    """An input the page will not process; the message is written for the person who sent it."""


def read_image(data: bytes, name: str, limits: PageLimits):
    """The RGB image in ``data``, or :class:`Refused` saying why not.

    The size is checked before anything is parsed, the format is chosen by content among
    :data:`IMAGE_FORMATS` only (a name's suffix decides nothing), and the width and height the
    header claims are checked before a pixel is decoded: a 48 KB PNG that claims 20,000 x 20,000
    pixels is refused without allocating them.  Any failure of the decoder on a file that passed
    those checks (truncated, corrupt) is a refusal too, never a traceback in the page.
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise Refused(f"{name} is empty.")
    if len(data) > limits.max_upload_mb * MEBIBYTE:
        raise Refused(f"{name} is {len(data) / MEBIBYTE:.1f} MB; the limit is {limits.max_upload_mb} MB.")
    accepted = "JPEG, PNG, WebP, BMP or GIF"
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            width, height = image.size
            if width * height > limits.max_image_pixels:
                raise Refused(too_many_pixels(name, f"{width} x {height} pixels", limits))
            return image.convert("RGB")  # reads the first frame of an animation only
    except Image.DecompressionBombError:  # Pillow's own ceiling, met before the header could be checked here
        raise Refused(too_many_pixels(name, "more pixels than Pillow will decode", limits)) from None
    except UnidentifiedImageError:
        raise Refused(f"{name} is not a {accepted} image.") from None
    except Refused:
        raise
    except Exception as err:  # noqa: BLE001  (whatever the decoder raises, it is this file's fault)
        raise Refused(f"{name} could not be decoded as an image ({type(err).__name__}: {err}).") from None


def too_many_pixels(name: str, what: str, limits: PageLimits) -> str:
    return f"{name} has {what}; the limit is {limits.max_image_pixels:,} pixels (width x height)."


def fill_prompt(template: str, question: str) -> str:
    """``template`` with every ``{}`` replaced by ``question``; without ``{}``, the question appended.

    Only the two characters ``{}`` are special: nothing is passed to ``str.format``, so a prompt
    such as ``{:>1000000000}`` is text, not a gigabyte of padding, and other braces stay as typed.
    Appending matches what ``predict_answers`` does with a template that has no ``{}``.
    """
    return template.replace("{}", question) if "{}" in template else template + question


def check_length(what: str, text: str, limit: int) -> None:
    """:class:`Refused` when ``text`` is longer than ``limit`` characters (a client can bypass the page's own cap)."""
    if len(text) > limit:
        raise Refused(f"The {what} has {len(text)} characters; the limit is {limit}.")


# --- one generation at a time -------------------------------------------------------------


class Busy(RuntimeError):
    """The model is taken and the request could not wait (queue full) or waited too long; try again later."""


@dataclass(frozen=True)
class QueueLimits:
    """How many requests may wait for the model behind the one it runs, and for how long each."""

    max_waiting: int = 4
    wait_seconds: float = 30.0


class GenerationQueue:
    """One generation at a time, first come first served, with at most ``max_waiting`` requests
    waiting and none waiting longer than ``wait_seconds``: beyond either, :class:`Busy`.

    One at a time because every page shares the model and torch's global RNG (the sampling seed);
    bounded because each waiting request is a page that looks frozen, and an unbounded line of them
    only grows when requests arrive faster than the model answers.
    """

    def __init__(self, limits: QueueLimits = QueueLimits()):
        self.limits = limits
        self._condition = threading.Condition()
        self._running = False
        self._waiting: collections.deque[object] = collections.deque()

    @property
    def waiting(self) -> int:
        with self._condition:
            return len(self._waiting)

    @contextlib.contextmanager
    def turn(self):
        """Hold the model for the ``with`` block, after the requests that came before this one."""
        with self._condition:
            if self._running or self._waiting:
                self._wait_in_line()
            self._running = True
        try:
            yield
        finally:
            with self._condition:
                self._running = False
                self._condition.notify_all()

    def _wait_in_line(self) -> None:
        """Called holding the condition: return when this request is first in line and the model is free."""
        limits = self.limits
        if len(self._waiting) >= limits.max_waiting:
            raise Busy(f"The model is busy ({len(self._waiting)} requests are already waiting); try again in a moment.")
        ticket = object()
        self._waiting.append(ticket)
        deadline = time.monotonic() + limits.wait_seconds
        try:
            while self._running or self._waiting[0] is not ticket:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Busy(f"The model stayed busy for {limits.wait_seconds:g} s; try again in a moment.")
                self._condition.wait(left)
        finally:
            self._waiting.remove(ticket)
            self._condition.notify_all()  # the next in line may now be first


# --- what to serve ----------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    """Everything that decides which model is built; hashable, so it keys Streamlit's resource cache."""

    checkpoint: str
    model_type: str | None = None
    cfg_path: str | None = None
    arch: str | None = None
    options: tuple[tuple[str, object], ...] = ()  # model-config keys and values
    device: str = "cpu"

    def describe(self) -> str:
        what = self.cfg_path or f"{self.arch or 'blip2_internlm'} / {self.model_type}"
        return what + "".join(f", {key}={value}" for key, value in self.options)


@dataclass
class ServedModel:
    model: object
    vis_processor: object
    question_processor: object
    source: ModelSource
    load_report: str
    load_seconds: float
    #: one generation at a time: sessions share the model and torch's global RNG (the sampling seed)
    queue: GenerationQueue = field(default_factory=GenerationQueue)


def check_source(source: ModelSource) -> None:
    """Fail on an unknown arch, model type, config file or model option, without building anything."""
    from blip2_internlm.factory import merged_model_config

    merged_model_config(source.arch, source.model_type, cfg_path=source.cfg_path, options=dict(source.options))


def question_processor_for(txt_processors):
    """The question processor evaluation uses: ``--cfg-path``'s when its dataset has one (``blip_question``
    in LAVIS's VQAv2 configs), else ``chinese_question``, the processor of this project's VQA configs."""
    from lavis.common.registry import registry

    names = {cls: name for name, cls in registry.mapping["processor_name_mapping"].items()}
    processor = txt_processors.get("eval")
    if names.get(type(processor), "").endswith("question"):
        return processor
    return registry.get_processor_class("chinese_question")()


def load_served_model(source: ModelSource, queue_limits: QueueLimits = QueueLimits()) -> ServedModel:
    """The model with ``source.checkpoint`` loaded (tensors only, every trainable weight required) and its
    eval processors: ``blip2_internlm.load_model_and_preprocess``; generations on it wait in a queue
    bounded by ``queue_limits``."""
    from lavis.processors.base_processor import BaseProcessor

    from blip2_internlm.inference import load_model_and_preprocess

    started = time.perf_counter()
    model, vis_processors, txt_processors = load_model_and_preprocess(
        source.arch,
        source.model_type,
        is_eval=True,
        device=source.device,
        checkpoint=source.checkpoint,
        cfg_path=source.cfg_path,
        **dict(source.options),
    )
    if type(vis_processors["eval"]) is BaseProcessor:  # LAVIS's stand-in when no processor is configured
        raise ValueError(f"{source.describe()} names no eval image processor (preprocess.vis_processor.eval)")
    report = model.checkpoint_report.summary()
    seconds = time.perf_counter() - started
    print(f"built {source.describe()} on {source.device} in {seconds:.1f} s; {report}", file=sys.stderr, flush=True)
    return ServedModel(
        model,
        vis_processors["eval"],
        question_processor_for(txt_processors),
        source,
        report,
        seconds,
        GenerationQueue(queue_limits),
    )


# --- generation ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TimedText:
    text: str
    seconds: float


def caption_image(
    served: ServedModel,
    image,
    *,
    prompt: str,
    num_beams: int,
    max_length: int,
    top_p: float | None = None,
    seed: int = 0,
) -> TimedText:
    """The model's ``generate`` on one PIL image: beam search, or nucleus sampling when ``top_p`` is given
    (seeded, so the same settings give the same caption).  :class:`Busy` when the queue is full or the
    wait times out; the time shown is the model's, not the wait."""
    import torch

    with served.queue.turn(), torch.inference_mode():
        started = time.perf_counter()
        pixels = served.vis_processor(image).unsqueeze(0).to(served.source.device)
        sampling = top_p is not None
        if sampling:
            torch.manual_seed(seed)
        (text,) = served.model.generate(
            {"image": pixels},
            prompt=prompt,
            num_beams=num_beams,
            max_length=max_length,
            use_nucleus_sampling=sampling,
            top_p=top_p if sampling else 0.9,
        )
        return TimedText(text, time.perf_counter() - started)


def answer_question(
    served: ServedModel, image, question: str, *, prompt: str, num_beams: int, max_length: int
) -> TimedText:
    """The model's ``predict_answers`` (LAVIS's VQA contract) on one image and question, the question
    normalised by the evaluation's question processor.

    The prompt template is filled here by :func:`fill_prompt` and handed over as the whole question
    with the template ``{}``, so ``predict_answers``' ``str.format`` never reads text a user typed as
    a format string; for a template with one ``{}`` and no other braces the model sees the same text.
    """
    import torch

    with served.queue.turn(), torch.inference_mode():
        started = time.perf_counter()
        pixels = served.vis_processor(image).unsqueeze(0).to(served.source.device)
        (answer,) = served.model.predict_answers(
            {"image": pixels, "text_input": [filled_question(served, question, prompt)]},
            prompt="{}",
            num_beams=num_beams,
            max_len=max_length,
        )
        return TimedText(answer, time.perf_counter() - started)


def filled_question(served: ServedModel, question: str, prompt: str) -> str:
    """What :func:`answer_question` hands ``predict_answers`` (with the template ``{}``) for ``question``:
    the question normalised by the evaluation's question processor, in ``prompt`` by :func:`fill_prompt`."""
    return fill_prompt(prompt, served.question_processor(question))


#: A chat keeps at most this many user turns (older ones are dropped from what the model reads).
MAX_CHAT_TURNS = 8


def chat_reply(served: ServedModel, image, history: list[dict], *, max_length: int) -> TimedText:
    """An instruction model's next assistant turn for ``history`` (ending with the user's message) about one PIL
    image, greedy; its last :data:`MAX_CHAT_TURNS` user turns are what the model reads.  :class:`Busy` as for
    captions."""
    import torch

    users = [i for i, message in enumerate(history) if message["role"] == "user"]
    recent = history[users[-MAX_CHAT_TURNS] :] if len(users) > MAX_CHAT_TURNS else history
    with served.queue.turn(), torch.inference_mode():
        started = time.perf_counter()
        pixels = served.vis_processor(image).to(served.source.device)
        text = served.model.chat(pixels, recent, num_beams=1, max_length=max_length)
        return TimedText(text, time.perf_counter() - started)


# --- samples --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    path: str
    references: dict = field(default_factory=dict, hash=False, compare=False)  # lang -> captions
    questions: dict = field(default_factory=dict, hash=False, compare=False)  # lang -> [(question, answer)]

    @property
    def name(self) -> str:
        return Path(self.path).name


def small_shapes_root() -> Path:
    """A few held-out synthetic shapes images (generated on first use, about a second)."""
    from blip2_internlm.datasets.builders import default_data_root
    from blip2_internlm.datasets.shapes import generate_shapes

    args = {"splits": {"test": 24}, "image_size": 64, "seed": 0, "max_objects": 1}
    root = Path(default_data_root(args))
    generate_shapes(root, **args)
    return root


def load_samples(root: Path) -> list[Sample]:
    """The test split of a shapes data set (with its reference captions and questions), or the images in a folder."""
    root = Path(root)
    manifest = root / "manifest.json"
    if not manifest.is_file():
        paths = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:MAX_SAMPLES]
        return [Sample(str(p)) for p in paths]
    files = json.loads(manifest.read_text())["files"]
    split = "test" if "test" in files else next(s for s in ("val", "train") if s in files)
    references, questions = {}, {}
    for lang, names in files[split].items():
        for record in json.loads((root / names["caption"]).read_text()):
            references.setdefault(record["image"], {})[lang] = record["caption"]
        for record in json.loads((root / names["vqa"]).read_text()):
            asked = questions.setdefault(record["image"], {}).setdefault(lang, [])
            asked.append((record["question"], record["answer"][0]))
    images = list(references.items())[:MAX_SAMPLES]
    return [Sample(str(root / image), refs, questions.get(image, {})) for image, refs in images]


# --- the demo's model -----------------------------------------------------------------------


def demo_stage2_checkpoint(demo_output: Path) -> Path:
    """The checkpoint the demo evaluates: ``checkpoint_last.pth`` of the newest stage-2 job under ``demo_output``
    that has a checkpoint, else that job's last epoch checkpoint."""
    from blip2_internlm.checkpoint import EPOCH_CHECKPOINT, LAST

    jobs = sorted(p for p in (demo_output / "stage2").glob("*") if p.is_dir())  # job ids are timestamps
    for job in reversed(jobs):
        if (job / LAST).is_file():
            return job / LAST
        epochs = [(int(m.group(1)), p) for p in job.iterdir() if (m := EPOCH_CHECKPOINT.match(p.name))]
        if epochs:
            return max(epochs)[1]
    raise SystemExit(
        f"no stage-2 checkpoint under {demo_output / 'stage2'}: run `make demo` first "
        f"(or pass --checkpoint with --model-type / --cfg-path)"
    )


def resolve_demo(args) -> None:
    """Turn ``--from-demo DIR`` into the model, LLM and language ``make demo`` used there."""
    output = args.from_demo.absolute()
    checkpoint = demo_stage2_checkpoint(output)
    llm_dir = output / "llm"
    if not (llm_dir / "config.json").is_file():
        raise SystemExit(f"{llm_dir} has no pretrained LLM (config.json): run `make demo` first")
    result = output / "result.json"
    lang = json.loads(result.read_text())["lang"] if result.is_file() else None
    args.model_type, args.cfg_path, args.checkpoint = "tiny", None, checkpoint
    args.options = [f"model.llm_model={llm_dir}", *args.options]
    args.lang = args.lang or lang


def demo_samples() -> Path:
    """The demo data's root, generated again if the cache was cleared (seconds): the samples of ``--from-demo``."""
    from blip2_internlm.datasets.builders import default_data_root, generator_args
    from blip2_internlm.datasets.shapes import generate_shapes
    from blip2_internlm.tools.demo import GENERATOR

    data = generator_args(GENERATOR)
    root = Path(default_data_root(data))
    generate_shapes(root, **data)
    return root


# --- command line ---------------------------------------------------------------------------


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m blip2_internlm.tools.app",
        description="Web demo (Streamlit): captions and answers from a stage-2 or fine-tuned checkpoint.",
    )
    add_model_arguments(parser)
    parser.add_argument("--samples", type=Path, help="sample images: a shapes data set or a folder of images")
    parser.add_argument("--lang", choices=sorted(LANGUAGES), help="language selected at start (default zh)")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: %(default)s); the page has no authentication: see docs/app.md",
    )
    parser.add_argument("--port", type=int, default=8501)
    limits = parser.add_argument_group("limits (docs/app.md)")
    add_input_limit_arguments(limits)
    queue_limits = QueueLimits()
    limits.add_argument(
        "--max-waiting",
        type=non_negative_int,
        default=queue_limits.max_waiting,
        help="requests that may wait for the model behind the running one; more are told it is busy "
        "(default: %(default)s)",
    )
    limits.add_argument(
        "--wait-timeout",
        type=positive_float,
        default=queue_limits.wait_seconds,
        metavar="SECONDS",
        help="how long a request waits for the model before it is told it is busy (default: %(default)s)",
    )
    return parser


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that choose the model (``--model-type`` / ``--cfg-path`` / ``--from-demo``, ``--checkpoint``,
    ``--arch``, ``--options``, ``--device``): the app's and the OpenAI-compatible server's
    (``blip2_internlm.serve``)."""
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model-type", help="a model type of --arch (tiny, pretrain_internlm2_1.8b, ...)")
    which.add_argument(
        "--cfg-path", type=Path, help="a training/evaluation YAML: its model: section and its dataset's eval processors"
    )
    which.add_argument(
        "--from-demo", type=Path, metavar="DIR", help="the model `make demo` trained under DIR (output/demo)"
    )
    parser.add_argument("--checkpoint", type=Path, help="stage-2 or fine-tuned checkpoint (.pth or .safetensors)")
    parser.add_argument("--arch", help="the registered model of --model-type (default: blip2_internlm)")
    parser.add_argument(
        "--options",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="model-config overrides, e.g. model.llm_model=DIR (the model. prefix is optional)",
    )
    parser.add_argument("--device", help="default: cuda when available, else cpu")


def add_input_limit_arguments(limits) -> None:
    """The :class:`PageLimits` flags (an argument group or parser): what one request may bring."""
    page_limits = PageLimits()
    limits.add_argument(
        "--max-upload-mb",
        type=positive_int,
        default=page_limits.max_upload_mb,
        help="largest image file accepted, in MB of 2**20 bytes (default: %(default)s)",
    )
    limits.add_argument(
        "--max-image-pixels",
        type=positive_int,
        default=page_limits.max_image_pixels,
        help="largest width x height accepted, checked before decoding (default: %(default)s)",
    )
    limits.add_argument(
        "--max-prompt-chars",
        type=positive_int,
        default=page_limits.max_prompt_chars,
        help="longest caption or question prompt (default: %(default)s)",
    )
    limits.add_argument(
        "--max-question-chars",
        type=positive_int,
        default=page_limits.max_question_chars,
        help="longest question (default: %(default)s)",
    )


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a number >= 0")
    return value


def page_limits(args) -> PageLimits:
    return PageLimits(args.max_upload_mb, args.max_image_pixels, args.max_prompt_chars, args.max_question_chars)


def queue_limits(args) -> QueueLimits:
    return QueueLimits(args.max_waiting, args.wait_timeout)


def resolve_args(argv) -> argparse.Namespace:
    """Parsed and checked arguments, ``--from-demo`` resolved; a bad one exits with a message naming it."""
    parser = argument_parser()
    args = parser.parse_args(argv)
    check_model_arguments(parser, args)
    if args.from_demo and args.samples is None:
        args.samples = demo_samples()
    if args.samples and not args.samples.is_dir():
        parser.error(f"--samples {args.samples}: not a directory")
    args.lang = args.lang or "zh"
    return args


def check_model_arguments(parser: argparse.ArgumentParser, args) -> None:
    """The flags of :func:`add_model_arguments` checked: ``--from-demo`` resolved (it also sets ``args.lang``
    when that is unset), the checkpoint and config files checked, ``--device`` decided; a bad one exits
    naming it."""
    if args.from_demo:
        if args.checkpoint:
            parser.error("--from-demo chooses the checkpoint; do not pass --checkpoint with it")
        resolve_demo(args)
    if args.checkpoint is None:
        parser.error("--checkpoint is required with --model-type / --cfg-path")
    from blip2_internlm.checkpoint import diagnose_checkpoint_file

    if not args.checkpoint.is_file():
        parser.error(f"--checkpoint {args.checkpoint}: no such file")
    problem = None if args.checkpoint.suffix == ".safetensors" else diagnose_checkpoint_file(args.checkpoint)
    if problem:
        parser.error(f"--checkpoint {args.checkpoint} {problem}")
    if args.cfg_path and not args.cfg_path.is_file():
        parser.error(f"--cfg-path {args.cfg_path}: no such file")
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"


def model_source(args) -> ModelSource:
    from blip2_internlm.factory import parse_model_options

    return ModelSource(
        checkpoint=str(Path(args.checkpoint).absolute()),
        model_type=args.model_type,
        cfg_path=str(Path(args.cfg_path).absolute()) if args.cfg_path else None,
        arch=args.arch,
        options=tuple(parse_model_options(args.options).items()),
        device=args.device,
    )


def script_argv(args) -> list[str]:
    """The resolved arguments for the page, so every rerun serves exactly what was checked here."""
    argv = ["--checkpoint", str(Path(args.checkpoint).absolute()), "--lang", args.lang, "--device", args.device]
    argv += ["--arch", args.arch] if args.arch else []
    argv += ["--cfg-path", str(Path(args.cfg_path).absolute())] if args.cfg_path else ["--model-type", args.model_type]
    if args.samples:
        argv += ["--samples", str(Path(args.samples).absolute())]
    if args.options:
        argv += ["--options", *args.options]
    argv += ["--max-upload-mb", str(args.max_upload_mb), "--max-image-pixels", str(args.max_image_pixels)]
    argv += ["--max-prompt-chars", str(args.max_prompt_chars), "--max-question-chars", str(args.max_question_chars)]
    argv += ["--max-waiting", str(args.max_waiting), "--wait-timeout", repr(args.wait_timeout)]
    return argv


def main(argv=None):
    args = resolve_args(sys.argv[1:] if argv is None else argv)
    try:
        check_source(model_source(args))  # before the server starts
    except (ValueError, OSError) as err:
        raise SystemExit(f"blip2_internlm.tools.app: {err}") from None
    from streamlit.web import cli

    print(f"serving {args.checkpoint} on http://{args.host}:{args.port}", flush=True)
    sys.argv = [
        "streamlit",
        "run",
        __file__,
        "--server.address",
        args.host,
        "--server.port",
        str(args.port),
        "--server.maxUploadSize",  # Streamlit's own check, before the page's (read_image)
        str(args.max_upload_mb),
        "--client.showErrorDetails",  # an unforeseen exception: a generic message in the page, the traceback in the log
        "none",
        "--server.headless",
        "true",
        "--server.fileWatcherType",
        "none",
        "--server.runOnSave",
        "false",
        "--browser.gatherUsageStats",
        "false",
        "--client.toolbarMode",
        "minimal",
        "--",
        *script_argv(args),
    ]
    sys.exit(cli.main())


# --- the page (Streamlit runs this file as a script on every interaction) ---------------------


def page(argv) -> None:
    import streamlit as st

    from blip2_internlm.tiny.pretrain_text import CAPTION_PROMPTS, VQA_PROMPTS

    st.set_page_config(page_title="blip2-internlm", layout="wide")
    cached_model, cached_samples = _cached_resources()
    args = resolve_args(argv)
    limits = page_limits(args)
    st.title("BLIP-2 with InternLM2")

    try:
        served = cached_model(model_source(args), queue_limits(args))
    except (RuntimeError, ValueError, OSError) as err:  # missing asset, unfit checkpoint: the message, not a traceback
        st.error(f"Could not load the model: {type(err).__name__}: {err}")
        st.stop()
    samples = cached_samples(str(args.samples) if args.samples else None)

    with st.sidebar:
        st.header("Model")
        st.caption(
            f"{served.source.describe()}  \ncheckpoint `{served.source.checkpoint}`  \n"
            f"device {served.source.device}, built in {served.load_seconds:.1f} s"
        )
        with st.expander("Checkpoint load report"):
            st.text(served.load_report)
        lang = st.radio(
            "Language",
            list(LANGUAGES),
            index=list(LANGUAGES).index(args.lang),
            format_func=LANGUAGES.get,
            horizontal=True,
            key="lang",
        )
        st.header("Generation")
        num_beams = st.slider("Beam size", 1, 10, 5, key="num_beams")
        sampling = st.toggle(
            "Nucleus sampling (captions)",
            key="sampling",
            help="Answers always use beam search, as VQA evaluation does.",
        )
        top_p = st.slider("top-p", 0.05, 1.0, 0.9, 0.05, disabled=not sampling, key="top_p")
        seed = int(st.number_input("Seed", 0, 2**31 - 1, 0, disabled=not sampling, key="seed"))
        max_caption = st.slider("Max caption length (tokens)", 1, 100, 30, key="max_caption")
        max_answer = st.slider("Max answer length (tokens)", 1, 50, 10, key="max_answer")
        with st.expander("Prompts"):
            caption_prompt = st.text_input(
                "Caption prompt", CAPTION_PROMPTS[lang], max_chars=limits.max_prompt_chars, key=f"caption_prompt_{lang}"
            )
            vqa_prompt = st.text_input(
                "Question prompt ({} is the question)",
                VQA_PROMPTS[lang],
                max_chars=limits.max_prompt_chars,
                key=f"vqa_prompt_{lang}",
            )
            st.caption(
                f"At most {limits.max_prompt_chars} characters each.  Every `{{}}` in the question prompt is "
                "replaced by the question (other braces are plain text); a prompt without `{}` gets the "
                "question appended."
            )

    image_column, text_column = st.columns([1, 2])
    with image_column:
        upload = st.file_uploader(
            "Upload an image",
            type=[s.lstrip(".") for s in IMAGE_SUFFIXES],
            max_upload_size=limits.max_upload_mb,
            key="upload",
        )
        st.caption(
            f"JPEG, PNG, WebP, BMP or GIF (its first frame), at most {limits.max_upload_mb} MB and "
            f"{limits.max_image_pixels:,} pixels (width x height)."
        )
        sample = (
            st.selectbox(
                "…or pick a sample", samples, format_func=lambda s: s.name, key="sample", disabled=upload is not None
            )
            if samples
            else None
        )
        if upload is not None:
            data, name = upload.getvalue(), upload.name
        elif sample is not None:
            data, name = Path(sample.path).read_bytes(), sample.name
        else:
            st.info("Upload an image.")
            st.stop()
        try:
            image = read_image(data, name, limits)
        except Refused as refusal:
            st.error(str(refusal))
            st.stop()
        preview = image.copy()
        preview.thumbnail((256, 256))  # at least 1 pixel each way: Streamlit's own resize fails on a 16000 x 16 image
        st.image(preview, caption=name, width=256)
        if upload is None and sample.references.get(lang):
            st.caption("Reference: " + " / ".join(sample.references[lang]))
    digest = hashlib.sha256(data).hexdigest()

    with text_column:
        st.subheader("Caption")
        caption_settings = (digest, caption_prompt, num_beams, max_caption) + ((top_p, seed) if sampling else ())
        caption = generation(
            "caption",
            caption_settings,
            lambda: caption_image(
                served,
                image,
                prompt=checked("caption prompt", caption_prompt, limits.max_prompt_chars),
                num_beams=num_beams,
                max_length=max_caption,
                top_p=top_p if sampling else None,
                seed=seed,
            ),
        )
        if caption is not None:
            how = f"sampling top-p {top_p:g} seed {seed}" if sampling else f"beam {num_beams}"
            show_generation(
                "caption",
                caption,
                served.source.device,
                f"{name} · {LANGUAGES[lang]} · {how} · max {max_caption} tokens",
            )

        st.subheader("Question")
        with st.form("ask", border=False):
            suggestions = sample.questions.get(lang, []) if upload is None and sample is not None else []
            question = st.text_input(
                "Question",
                key="question",
                max_chars=limits.max_question_chars,
                placeholder=suggestions[0][0] if suggestions else VQA_EXAMPLES[lang],
                help=f"At most {limits.max_question_chars} characters.",
            )
            if st.form_submit_button("Ask") and question.strip():
                st.session_state.asked = question.strip()
        asked = st.session_state.get("asked")
        if asked:
            answer = generation(
                "answer",
                (digest, asked, vqa_prompt, num_beams, max_answer),
                lambda: answer_question(
                    served,
                    image,
                    checked("question", asked, limits.max_question_chars),
                    prompt=checked("question prompt", vqa_prompt, limits.max_prompt_chars),
                    num_beams=num_beams,
                    max_length=max_answer,
                ),
            )
            if answer is not None:
                show_generation(
                    "answer",
                    answer,
                    served.source.device,
                    f"{asked} · {name} · {LANGUAGES[lang]} · beam {num_beams} · max {max_answer} tokens",
                )
        if suggestions:
            st.caption("Questions with reference answers: " + "; ".join(f"{q} → {a}" for q, a in suggestions))
        if hasattr(served.model, "chat"):
            chat_section(served, image, digest, lang, limits, max_caption)


CHAT_LABELS = {
    "zh": ("对话", "问点什么…", "清空对话"),
    "en": ("Chat", "Ask something…", "Clear the chat"),
}


def chat_section(served: ServedModel, image, digest: str, lang: str, limits: PageLimits, max_length: int) -> None:
    """Multi-turn chat about the image (instruction models): the history lives in the session, a new image or
    the clear button starts a new one; each message is held to the question's length limit."""
    import streamlit as st

    title, placeholder, clear = CHAT_LABELS[lang]
    st.subheader(title)
    if st.session_state.get("chat_image") != digest or st.button(clear, key="chat_clear"):
        st.session_state.chat, st.session_state.chat_image = [], digest
    history = st.session_state.chat
    for message in history:
        with st.chat_message(message["role"]):
            st.text(message["content"])
    message = st.chat_input(placeholder, max_chars=limits.max_question_chars, key="chat_input")
    if not message or not message.strip():
        return
    try:
        text = checked("message", message.strip(), limits.max_question_chars)
    except Refused as refusal:
        st.error(str(refusal))
        return
    with st.chat_message("user"):
        st.text(text)
    try:
        reply = chat_reply(served, image, history + [{"role": "user", "content": text}], max_length=max_length)
    except Busy as busy:
        st.warning(str(busy))
        return
    if not reply.text:  # nothing to keep: an empty turn would break the history's alternation
        st.info("(no answer)")
        return
    history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply.text}]
    with st.chat_message("assistant"), st.container(key="chat_reply"):
        st.text(reply.text)
        st.caption(f"{reply.seconds * 1000:.0f} ms on {served.source.device} · turn {len(history) // 2}")


def checked(what: str, text: str, limit: int) -> str:
    """``text``, once :func:`check_length` passes it.  Streamlit already cuts a text box's value to its
    ``max_chars``, whatever a client sends; this refuses anything that reaches the model another way."""
    check_length(what, text, limit)
    return text


def generation(key: str, settings: tuple, generate) -> TimedText | None:
    """The page's caption or answer for ``settings``: kept from an earlier run when they are the same
    (typing a question does not regenerate the caption), else ``generate()``'s.  A refused input or a
    busy model is a message in the page and None; nothing is kept, so the next run tries again."""
    import streamlit as st

    if st.session_state.get(f"{key}_settings") == settings:
        return st.session_state[key]
    st.session_state.pop(f"{key}_settings", None)
    try:
        result = generate()
    except Refused as refusal:
        st.error(str(refusal))
        return None
    except Busy as busy:
        st.warning(str(busy))
        return None
    st.session_state[key], st.session_state[f"{key}_settings"] = result, settings
    return result


VQA_EXAMPLES = {"zh": "图中的形状是什么颜色？", "en": "what color is the shape?"}


def show_generation(key: str, generation: TimedText, device: str, details: str) -> None:
    import streamlit as st

    # keyed containers (.st-key-caption, .st-key-answer) and st.text (no Markdown) keep the text as generated
    with st.container(key=key):
        st.text(generation.text)
        st.caption(f"{generation.seconds * 1000:.0f} ms on {device} · {details}")


@functools.cache
def _cached_resources():
    import streamlit as st

    @st.cache_resource(show_spinner="Loading the model…")
    def cached_model(source: ModelSource, queue_limits: QueueLimits) -> ServedModel:
        return load_served_model(source, queue_limits)

    @st.cache_data(show_spinner=False)
    def cached_samples(root: str | None) -> list[Sample]:
        return load_samples(Path(root) if root else small_shapes_root())

    return cached_model, cached_samples


if __name__ == "__main__":
    from streamlit import runtime

    if runtime.exists():
        # the page from the imported module, not from this re-executed script: its classes and cached
        # functions are then the same objects on every rerun, so Streamlit's caches keep their keys
        from blip2_internlm.tools.app import page as imported_page

        imported_page(sys.argv[1:])
    else:
        main()
