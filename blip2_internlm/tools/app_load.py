"""Load test of the web demo on loopback: ``python -m blip2_internlm.tools.app_load --sessions 8 --seconds 60``.

Starts ``python -m blip2_internlm.tools.app`` on a free loopback port (or drives one already running,
``--url``), then runs that many concurrent page sessions for that long.  Each session is a client of
Streamlit's own protocol, as the browser is, without a browser: it opens the page's websocket
(``/_stcore/stream``, protobuf ``BackMsg`` / ``ForwardMsg``), and in a loop uploads a new image
through ``/_stcore/upload_file`` and reruns the page (the caption is generated), then submits a
question (the answer is generated).  Each of those two steps is one request: the time from the
rerun message to the page's ``script_finished``, and what the page showed: the caption or answer
(ok), the "busy, try again" warning (busy), or anything else (an error message, an exception, no
result, a dropped connection: error).

Without a model named after ``--``, the app serves a stage-2-style checkpoint of the ``tiny``
model type built here (its initial trainable weights); anything after ``--`` goes to the app, e.g.
``-- --from-demo output/demo --max-waiting 2``.  Results: docs/app.md ("Load").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

QUESTIONS = ("what color is the shape?", "what shape is it?", "图中的形状是什么颜色？", "图中是什么形状？")
MODEL_FLAGS = ("--model-type", "--cfg-path", "--from-demo")
XSRF_COOKIE = "_streamlit_xsrf"
#: the details line under a caption or answer: "<ms> ms on <device> · <settings>"
SHOWN_LATENCY = re.compile(r"(\d+) ms on \S+ · ")


# --- the app under test --------------------------------------------------------------------------


def tiny_checkpoint(directory: Path) -> Path:
    """The ``tiny`` model type's trainable weights in LAVIS's stage-2 layout: what the app needs to serve it."""
    from lavis.models import load_model_and_preprocess

    from blip2_internlm.checkpoint import save_checkpoint_file

    model, _, _ = load_model_and_preprocess("blip2_internlm", "tiny", is_eval=True)
    frozen = {name for name, parameter in model.named_parameters() if not parameter.requires_grad}
    state = {key: value for key, value in model.state_dict().items() if key not in frozen}
    return save_checkpoint_file({"model": state, "epoch": 0}, directory / "checkpoint_tiny.pth")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServedApp:
    """``python -m blip2_internlm.tools.app APP_ARGS`` on a loopback port, its process group killed on exit."""

    def __init__(self, app_args: list[str], log: Path):
        self.port, self.log = free_port(), log
        command = [sys.executable, "-m", "blip2_internlm.tools.app", *app_args, "--port", str(self.port)]
        print("app:", shlex.join(command), file=sys.stderr, flush=True)
        with open(log, "w") as log_file:
            self.process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_until_up(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/_stcore/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(
                    f"the app did not come up (exit {self.process.poll()}):\n{self.log.read_text()[-3000:]}"
                )
            time.sleep(0.5)

    def close(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


# --- one page session -------------------------------------------------------------------------------


@dataclass
class Outcome:
    step: str  # "caption" or "answer"
    kind: str  # "ok", "busy" or "error"
    seconds: float  # the page run: waiting for the model, generating, and everything else the page does
    detail: str = ""
    model_seconds: float | None = None  # what the page shows: preprocessing and generation only


@dataclass
class PageRun:
    """What one rerun of the page showed."""

    captions: list[str] = field(default_factory=list)
    alerts: list[tuple[int, str]] = field(default_factory=list)  # (Alert.Format, body)
    exceptions: list[str] = field(default_factory=list)
    widgets: dict[str, object] = field(default_factory=dict)  # label -> widget proto


def random_image(rng: random.Random) -> bytes:
    """A new 64 x 64 PNG each time (a coloured rectangle): the page caches results per image digest."""
    import io

    from PIL import Image, ImageDraw

    image = Image.new("RGB", (64, 64), tuple(rng.randrange(200, 256) for _ in range(3)))
    x, y = rng.randrange(4, 32), rng.randrange(4, 32)
    colour = tuple(rng.randrange(0, 200) for _ in range(3))
    ImageDraw.Draw(image).rectangle((x, y, x + rng.randrange(8, 28), y + rng.randrange(8, 28)), fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


class PageSession:
    """One visitor: a websocket to the page, the upload endpoint, and the widget states it sends back."""

    def __init__(self, url: str, http, step_timeout: float):
        self.url, self.http, self.step_timeout = url, http, step_timeout
        self.websocket = None
        self.session_id = self.xsrf = ""

    async def open(self) -> PageRun:
        from websockets.asyncio.client import connect

        response = await self.http.get(f"{self.url}/_stcore/health")  # sets the XSRF cookie uploads need
        response.raise_for_status()
        self.xsrf = self.http.cookies.get(XSRF_COOKIE) or ""
        websocket_url = self.url.replace("http", "ws", 1) + "/_stcore/stream"
        self.websocket = await connect(
            websocket_url,
            subprotocols=["streamlit", self.xsrf] if self.xsrf else ["streamlit"],
            additional_headers={"Cookie": f"{XSRF_COOKIE}={self.xsrf}"} if self.xsrf else None,
            max_size=None,
        )
        return await self.rerun([])

    async def close(self) -> None:
        if self.websocket is not None:
            await self.websocket.close()

    async def rerun(self, widget_states) -> PageRun:
        """Send a rerun with ``widget_states`` and read what the page shows until the script finishes."""
        from streamlit.proto.BackMsg_pb2 import BackMsg
        from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

        message = BackMsg()
        message.rerun_script.query_string = ""
        message.rerun_script.widget_states.widgets.extend(widget_states)
        await self.websocket.send(message.SerializeToString())
        run = PageRun()
        async with asyncio.timeout(self.step_timeout):
            while True:
                forward = ForwardMsg()
                forward.ParseFromString(await self.websocket.recv())
                kind = forward.WhichOneof("type")
                if kind == "new_session":
                    self.session_id = forward.new_session.initialize.session_id
                elif kind == "delta" and forward.delta.WhichOneof("type") == "new_element":
                    self.collect(forward.delta.new_element, run)
                elif kind == "script_finished":
                    return run

    @staticmethod
    def collect(element, run: PageRun) -> None:
        kind = element.WhichOneof("type")
        if kind == "markdown":
            run.captions.append(element.markdown.body)
        elif kind == "alert":
            run.alerts.append((element.alert.format, element.alert.body))
        elif kind == "exception":
            run.exceptions.append(f"{element.exception.type}: {element.exception.message}")
        elif kind in ("file_uploader", "text_input", "button"):
            widget = getattr(element, kind)
            run.widgets[widget.label] = widget

    async def upload(self, uploader_id: str, name: str, data: bytes):
        """Put ``data`` where the uploader widget will find it; the widget state that names it."""
        from streamlit.proto.WidgetStates_pb2 import WidgetState

        file_id = str(uuid.uuid4())
        path = f"/_stcore/upload_file/{self.session_id}/{file_id}"
        response = await self.http.put(
            self.url + path, files={"file": (name, data, "image/png")}, headers={"X-Xsrftoken": self.xsrf}
        )
        response.raise_for_status()
        state = WidgetState(id=uploader_id)
        info = state.file_uploader_state_value.uploaded_file_info.add()
        info.name, info.size, info.file_id = name, len(data), file_id
        info.file_urls.file_id, info.file_urls.upload_url, info.file_urls.delete_url = file_id, path, path
        return state


def judged(step: str, run: PageRun, seconds: float) -> Outcome:
    """ok when the page shows the step's result (its details line names the latency), busy when it says
    the model is busy, error otherwise."""
    from streamlit.proto.Alert_pb2 import Alert

    if run.exceptions:
        return Outcome(step, "error", seconds, run.exceptions[0])
    results = [int(m.group(1)) for caption in run.captions if (m := SHOWN_LATENCY.match(caption))]
    expected = 1 if step == "caption" else 2
    if len(results) >= expected:
        return Outcome(step, "ok", seconds, model_seconds=results[expected - 1] / 1000)
    for format_, body in run.alerts:
        if format_ == Alert.WARNING and "busy" in body:
            return Outcome(step, "busy", seconds, body)
    errors = [body for format_, body in run.alerts if format_ == Alert.ERROR]
    return Outcome(step, "error", seconds, errors[0] if errors else "no result shown")


async def visitor(number: int, url: str, deadline: float, options, outcomes: list[Outcome]) -> None:
    """One session: upload an image, read its caption, ask a question, read the answer; again until the deadline.

    As in a browser, the page re-answers the last question when a new image arrives, so from the
    second round on an upload holds the model for two generations; each question differs from the
    one before, so every answer step generates.  After "busy" the visitor waits ``options.retry_after``
    seconds, as a person would before trying again.
    """
    import httpx
    from streamlit.proto.WidgetStates_pb2 import WidgetState

    rng = random.Random(number)
    async with httpx.AsyncClient(timeout=options.step_timeout) as http:
        session = PageSession(url, http, options.step_timeout)
        try:
            first = await session.open()
            uploader_id = first.widgets["Upload an image"].id
            round_ = 0
            while time.monotonic() < deadline:
                round_ += 1
                this_round: list[Outcome] = []
                started = time.perf_counter()
                try:
                    upload = await session.upload(uploader_id, f"visitor{number}-{round_}.png", random_image(rng))
                    run = await session.rerun([upload])
                    this_round.append(judged("caption", run, time.perf_counter() - started))
                    question = QUESTIONS[(number + round_) % len(QUESTIONS)]
                    asked = [WidgetState(id=run.widgets["Question"].id, string_value=question)]
                    asked.append(WidgetState(id=run.widgets["Ask"].id, trigger_value=True))
                    started = time.perf_counter()
                    run = await session.rerun([upload, *asked])
                    this_round.append(judged("answer", run, time.perf_counter() - started))
                except (TimeoutError, KeyError, httpx.HTTPError) as err:
                    this_round.append(Outcome("round", "error", time.perf_counter() - started, repr(err)))
                    if isinstance(err, TimeoutError):
                        return  # the websocket is now out of step with the page: this visitor leaves
                finally:
                    outcomes.extend(this_round)
                if any(outcome.kind == "busy" for outcome in this_round):
                    await asyncio.sleep(options.retry_after)
        except Exception as err:  # noqa: BLE001  (a dropped connection is a result of the test, not its failure)
            outcomes.append(Outcome("session", "error", 0.0, f"{type(err).__name__}: {err}"))
        finally:
            await session.close()


async def load(url: str, options) -> list[Outcome]:
    outcomes: list[Outcome] = []
    deadline = time.monotonic() + options.seconds
    await asyncio.gather(*(visitor(n, url, deadline, options, outcomes) for n in range(options.sessions)))
    return outcomes


# --- report -------------------------------------------------------------------------------------


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(fraction * len(ordered) + 0.5) - 1))]


def summary(outcomes: list[Outcome], sessions: int, seconds: float) -> dict:
    report = {"sessions": sessions, "seconds": seconds, "requests": len(outcomes)}
    for step in ("caption", "answer", "all"):
        chosen = [o for o in outcomes if step == "all" or o.step == step]
        counts = {kind: sum(o.kind == kind for o in chosen) for kind in ("ok", "busy", "error")}
        ok = [o for o in chosen if o.kind == "ok"]
        latency = {}
        if ok:
            page, model = [o.seconds for o in ok], [o.model_seconds for o in ok]
            latency = {
                "p50_ms": round(1000 * statistics.median(page)),
                "p95_ms": round(1000 * percentile(page, 0.95)),
                "max_ms": round(1000 * max(page)),
                "model_p50_ms": round(1000 * statistics.median(model)),
                "model_p95_ms": round(1000 * percentile(model, 0.95)),
            }
        busy = [o.seconds for o in chosen if o.kind == "busy"]
        if busy:
            latency["busy_p50_ms"] = round(1000 * statistics.median(busy))
            latency["busy_p95_ms"] = round(1000 * percentile(busy, 0.95))
        report[step] = {**counts, **latency}
    report["ok_per_second"] = round(report["all"]["ok"] / seconds, 2)
    report["errors"] = sorted({o.detail for o in outcomes if o.kind == "error"})[:10]
    return report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m blip2_internlm.tools.app_load",
        description="Concurrent page sessions against the web demo on loopback; prints counts and latencies as JSON.",
        epilog="Arguments after -- go to the app (default: the tiny model type's initial weights).",
    )
    parser.add_argument("--sessions", type=int, default=8, help="concurrent page sessions (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=60, help="how long they run (default: %(default)s)")
    parser.add_argument("--url", help="drive an app already running there instead of starting one")
    parser.add_argument(
        "--step-timeout", type=float, default=120, help="longest wait for one page run (default: %(default)s)"
    )
    parser.add_argument(
        "--retry-after",
        type=float,
        default=1.0,
        help="pause after a round with a busy step, in seconds (default: %(default)s)",
    )
    parser.add_argument("--log", type=Path, help="the started app's output (default: a temporary file)")
    argv = sys.argv[1:] if argv is None else list(argv)
    app_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)

    with tempfile.TemporaryDirectory(prefix="app-load-") as scratch:
        app = None
        if args.url is None:
            if not any(flag in app_args for flag in MODEL_FLAGS):
                checkpoint = tiny_checkpoint(Path(scratch))
                app_args = ["--model-type", "tiny", "--checkpoint", str(checkpoint), "--device", "cpu", *app_args]
            app = ServedApp(app_args, args.log or Path(scratch) / "app.log")
        try:
            if app is not None:
                app.wait_until_up()
            url = args.url or app.url
            outcomes = asyncio.run(load(url.rstrip("/"), args))
        finally:
            if app is not None:
                app.close()
                tracebacks = app.log.read_text().count("Traceback (most recent call last)")
        report = summary(outcomes, args.sessions, args.seconds)
        if app is not None:
            report["app_log_tracebacks"] = tracebacks
    print(json.dumps(report, ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
