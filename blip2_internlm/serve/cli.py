"""``python -m blip2_internlm.serve``: the command line, the model loaded once, uvicorn until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from blip2_internlm.serve.batcher import BatchLimits
from blip2_internlm.serve.server import ServeSettings
from blip2_internlm.tools.app import (
    LANGUAGES,
    add_input_limit_arguments,
    add_model_arguments,
    check_model_arguments,
    model_source,
    non_negative_float,
    page_limits,
    positive_float,
    positive_int,
)


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m blip2_internlm.serve",
        description="OpenAI-compatible chat-completions server with dynamic batching (docs/serve.md).",
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: %(default)s); the server has no authentication: see docs/serve.md",
    )
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--no-access-log", action="store_true", help="no log line per request")
    parser.add_argument(
        "--served-model-name", help="the model id clients name (default: ARCH/MODEL_TYPE, or the --cfg-path's stem)"
    )
    prompts = parser.add_argument_group("prompts of the base model (docs/serve.md, Requests)")
    prompts.add_argument(
        "--lang", choices=sorted(LANGUAGES), help="the language of the default prompts (default zh, or the demo's)"
    )
    prompts.add_argument("--caption-prompt", help="the caption prompt (default: the language's, as the web demo)")
    prompts.add_argument(
        "--vqa-prompt", help="the question prompt, {} is the question (default: the language's, as the web demo)"
    )
    parser.add_argument(
        "--image-root",
        type=Path,
        help="a directory whose files requests may name (file:// URLs or paths); without it only data: URIs",
    )
    batching = parser.add_argument_group("batching and queue (docs/serve.md, Batching)")
    defaults = BatchLimits()
    batching.add_argument(
        "--max-batch",
        type=positive_int,
        default=defaults.max_batch,
        help="requests in one model call; 1: no batching (default: %(default)s)",
    )
    batching.add_argument(
        "--batch-wait-ms",
        type=non_negative_float,
        default=defaults.window_seconds * 1000,
        help="how long the oldest waiting request waits for others to share its call (default: %(default)g)",
    )
    batching.add_argument(
        "--max-queue",
        type=positive_int,
        default=defaults.max_queue,
        help="requests that may wait for the model; more are answered 429 (default: %(default)s)",
    )
    serve_defaults = ServeSettings("")
    batching.add_argument(
        "--request-timeout",
        type=positive_float,
        default=serve_defaults.request_timeout,
        metavar="SECONDS",
        help="longest time from a request's arrival to its answer; past it, 504 (default: %(default)g)",
    )
    limits = parser.add_argument_group("limits of one request (docs/serve.md, Limits)")
    add_input_limit_arguments(limits)
    limits.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=serve_defaults.max_new_tokens,
        help="the largest max_tokens a request may ask for (default: %(default)s)",
    )
    return parser


def resolve_args(argv) -> argparse.Namespace:
    parser = argument_parser()
    args = parser.parse_args(argv)
    check_model_arguments(parser, args)
    if args.image_root is not None and not args.image_root.is_dir():
        parser.error(f"--image-root {args.image_root}: not a directory")
    args.lang = args.lang or "zh"
    return args


def served_model_name(args) -> str:
    if args.served_model_name:
        return args.served_model_name
    if args.cfg_path:
        return Path(args.cfg_path).stem
    return f"{args.arch or 'blip2_internlm'}/{args.model_type}"


def serve_settings(args) -> ServeSettings:
    return ServeSettings(
        model_id=served_model_name(args),
        limits=page_limits(args),
        batch=BatchLimits(args.max_batch, args.batch_wait_ms / 1000, args.max_queue),
        request_timeout=args.request_timeout,
        max_new_tokens=args.max_new_tokens,
        image_root=args.image_root.resolve() if args.image_root else None,
    )


def build_app(args):
    """The app for resolved ``args``: the model built and loaded (once), its runner, the batcher's limits."""
    from blip2_internlm.serve.engine import ModelRunner
    from blip2_internlm.serve.server import create_app
    from blip2_internlm.tiny.pretrain_text import CAPTION_PROMPTS, VQA_PROMPTS
    from blip2_internlm.tools.app import load_served_model

    served = load_served_model(model_source(args))
    caption_prompt = args.caption_prompt if args.caption_prompt is not None else CAPTION_PROMPTS[args.lang]
    vqa_prompt = args.vqa_prompt if args.vqa_prompt is not None else VQA_PROMPTS[args.lang]
    return create_app(ModelRunner(served, caption_prompt, vqa_prompt), serve_settings(args))


def main(argv=None) -> None:
    args = resolve_args(sys.argv[1:] if argv is None else argv)
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")

    try:
        app = build_app(args)
    except (ValueError, OSError, RuntimeError) as err:
        raise SystemExit(f"blip2_internlm.serve: cannot load the model: {type(err).__name__}: {err}") from None
    print(f"serving {app.state.settings.model_id} on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    # on SIGINT/SIGTERM uvicorn stops accepting, lets open requests finish (at most the request timeout),
    # then the app's lifespan stops the batcher
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="info",
        access_log=not args.no_access_log,
        timeout_graceful_shutdown=int(args.request_timeout) + 1,
    )
