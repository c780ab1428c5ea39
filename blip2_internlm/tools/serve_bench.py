"""Serving bench: ``python -m blip2_internlm.tools.serve_bench --clients 1,4,16 --seconds 20``.

Starts the OpenAI-compatible server (``python -m blip2_internlm.serve``) on a free loopback port twice: with
dynamic batching (``--max-batch 16``, the default window) and sequential (``--max-batch 1``).  Against each
it runs N concurrent clients for a fixed time, each sending chat-completion requests back to back (an image
as a data URI, from a pool of different images; a caption by default, ``--question`` for answers), and
reports requests per second, p50 / p95 latency, errors, and the mean batch the server formed (from its
``/health``).  The batching gain is the throughput with batching at the largest client count over the
sequential server's at the same count.  The servers are stopped with SIGTERM; whether each shut down
gracefully (its log says so, no traceback) is in the result.

Without a model after ``--`` the servers serve the ``tiny`` model type (its initial weights, saved as a
stage-2 checkpoint, as ``tools.app_load`` does); anything after ``--`` goes to both servers, e.g.
``-- --from-demo output/demo``.  Results: docs/serve.md ("Bench").
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import random
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from blip2_internlm.tools.app_load import MODEL_FLAGS, free_port, percentile, random_image, tiny_checkpoint

#: the two servers compared: (label, extra flags)
SERVERS = (("batched (--max-batch 16)", ["--max-batch", "16"]), ("sequential (--max-batch 1)", ["--max-batch", "1"]))
QUESTION = "what color is the shape?"


class Server:
    """``python -m blip2_internlm.serve ARGS`` on a loopback port; SIGTERM on :meth:`stop`, SIGKILL if it hangs."""

    def __init__(self, args: list[str], log: Path):
        self.port, self.log = free_port(), log
        command = [sys.executable, "-m", "blip2_internlm.serve", *args, "--port", str(self.port)]
        print("server:", shlex.join(command), file=sys.stderr, flush=True)
        with open(log, "w") as log_file:
            self.process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)

    def health(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as response:
            return json.loads(response.read())

    def wait_until_up(self, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.health()
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(
                    f"the server did not come up (exit {self.process.poll()}):\n{self.log.read_text()[-3000:]}"
                )
            time.sleep(0.3)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then wait for a graceful exit; SIGKILL after ``timeout`` seconds.  The exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        return self.process.wait()


@dataclass
class Outcome:
    ok: bool
    seconds: float
    detail: str = ""


def request_bodies(model: str, images: int, max_tokens: int | None, question: bool, seed: int = 0) -> list[bytes]:
    """One JSON body per image of a pool of ``images`` different 64 x 64 PNGs."""
    rng = random.Random(seed)
    bodies = []
    for _ in range(images):
        url = "data:image/png;base64," + base64.b64encode(random_image(rng)).decode()
        content = [{"type": "image_url", "image_url": {"url": url}}]
        if question:
            content.append({"type": "text", "text": QUESTION})
        body = {"model": model, "messages": [{"role": "user", "content": content}]}
        if max_tokens:
            body["max_tokens"] = max_tokens
        bodies.append(json.dumps(body).encode())
    return bodies


def client(
    port: int, bodies: list[bytes], start: int, deadline: float, outcomes: list[Outcome], limit: int | None = None
) -> None:
    """Requests back to back on one keep-alive connection until ``deadline`` (or ``limit`` requests)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    turn = start
    while time.monotonic() < deadline and (limit is None or turn - start < limit):
        body = bodies[turn % len(bodies)]
        turn += 1
        started = time.perf_counter()
        try:
            connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            payload = response.read()
            ok = response.status == 200
            detail = "" if ok else f"{response.status}: {payload[:200].decode(errors='replace')}"
        except (OSError, http.client.HTTPException) as err:
            ok, detail = False, f"{type(err).__name__}: {err}"
            connection.close()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        outcomes.append(Outcome(ok, time.perf_counter() - started, detail))
    connection.close()


def drive(server: Server, bodies: list[bytes], clients: int, seconds: float) -> dict:
    """``clients`` concurrent clients for ``seconds``: the row (requests/s of answered requests, latencies,
    errors, the server's mean batch over the run)."""
    before = server.health()
    outcomes: list[Outcome] = []
    deadline = time.monotonic() + seconds
    started = time.perf_counter()
    threads = [
        threading.Thread(target=client, args=(server.port, bodies, i, deadline, outcomes), daemon=True)
        for i in range(clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started  # the last requests finish after the deadline
    after = server.health()
    ok = [o.seconds for o in outcomes if o.ok]
    batches = after["batches"] - before["batches"]
    return {
        "clients": clients,
        "seconds": round(elapsed, 2),
        "ok": len(ok),
        "errors": len(outcomes) - len(ok),
        "requests_per_s": round(len(ok) / elapsed, 2),
        "p50_ms": round(1000 * statistics.median(ok)) if ok else None,
        "p95_ms": round(1000 * percentile(ok, 0.95)) if ok else None,
        "mean_batch": round((after["requests_batched"] - before["requests_batched"]) / batches, 2) if batches else None,
        "error_details": sorted({o.detail for o in outcomes if not o.ok})[:5],
    }


def format_table(result: dict) -> str:
    lines = [
        "| server | clients | requests/s | p50 ms | p95 ms | mean batch | ok | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['server']} | {row['clients']} | {row['requests_per_s']} | {row['p50_ms']} | {row['p95_ms']} | "
            f"{row['mean_batch']} | {row['ok']} | {row['errors']} |"
        )
    return "\n".join(lines)


def client_counts(text: str) -> list[int]:
    counts = [int(part) for part in text.split(",") if part]
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text}: expected positive client counts, e.g. 1,4,16")
    return counts


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m blip2_internlm.tools.serve_bench",
        description="Concurrent clients against the OpenAI-compatible server, with and without dynamic batching.",
        epilog="Arguments after -- go to both servers (default: the tiny model type's initial weights).",
    )
    parser.add_argument(
        "--clients", type=client_counts, default=[1, 4, 16], help="client counts, batched server (%(default)s)"
    )
    parser.add_argument(
        "--sequential-clients",
        type=client_counts,
        default=None,
        help="client counts for the --max-batch 1 server (default: the largest of --clients)",
    )
    parser.add_argument("--seconds", type=float, default=20, help="how long each row runs (default: %(default)s)")
    parser.add_argument("--images", type=int, default=32, help="different images the clients send (%(default)s)")
    parser.add_argument("--question", action="store_true", help="ask a question about each image (default: caption)")
    parser.add_argument("--max-tokens", type=int, help="max_tokens of every request (default: the mode's)")
    parser.add_argument("--warmup", type=int, default=4, help="requests sent to each server first (%(default)s)")
    parser.add_argument("--out", type=Path, help="write the result as JSON here too")
    return parser


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    server_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = argument_parser().parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    sequential_clients = args.sequential_clients or [max(args.clients)]
    rows, shutdowns = [], {}
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as scratch:
        if not any(flag in server_args for flag in MODEL_FLAGS):
            checkpoint = tiny_checkpoint(Path(scratch))
            server_args = ["--model-type", "tiny", "--checkpoint", str(checkpoint), "--device", "cpu", *server_args]
        for (label, flags), counts in zip(SERVERS, (args.clients, sequential_clients), strict=True):
            queue = ["--max-queue", str(4 * max(counts) + 4), "--no-access-log"]
            server = Server([*server_args, *queue, *flags], Path(scratch) / "log")
            try:
                model = server.wait_until_up()["model"]
                bodies = request_bodies(model, args.images, args.max_tokens, args.question)
                warm: list[Outcome] = []
                client(server.port, bodies, 0, float("inf"), warm, limit=args.warmup)
                if not all(outcome.ok for outcome in warm):
                    raise SystemExit(f"the warm-up failed: {[o.detail for o in warm if not o.ok][:3]}")
                for clients in counts:
                    row = {"server": label, **drive(server, bodies, clients, args.seconds)}
                    print(json.dumps(row), file=sys.stderr, flush=True)
                    rows.append(row)
            finally:
                code = server.stop()
                log = server.log.read_text()
            # uvicorn re-raises SIGTERM after its graceful shutdown: the exit status is -15 either way
            shutdowns[label] = {
                "exit_code": code,
                "graceful": "Application shutdown complete." in log and "batcher stopped" in log,
                "tracebacks_in_log": log.count("Traceback (most recent call last)"),
            }
    result = {"rows": rows, "shutdowns": shutdowns, "server_args": server_args, "seconds": args.seconds}
    batched = {row["clients"]: row for row in rows if row["server"] == SERVERS[0][0]}
    sequential = {row["clients"]: row for row in rows if row["server"] == SERVERS[1][0]}
    top = max(batched)
    if top in sequential and sequential[top]["requests_per_s"]:
        gain = batched[top]["requests_per_s"] / sequential[top]["requests_per_s"]
        result["batching_gain"] = {"clients": top, "batched_vs_sequential_server": round(gain, 2)}
    if 1 in batched and batched[1]["requests_per_s"]:
        result.setdefault("batching_gain", {})[f"{top}_clients_vs_1_client"] = round(
            batched[top]["requests_per_s"] / batched[1]["requests_per_s"], 2
        )
    print(format_table(result))
    print(json.dumps({key: result[key] for key in ("batching_gain", "shutdowns") if key in result}, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    return result


if __name__ == "__main__":
    main()
