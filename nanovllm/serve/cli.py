"""`nanovllm serve [MODEL]`: the OpenAI-compatible server (uvicorn + build_app)."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys

from nanovllm import envs
from nanovllm.cli.args import add_engine_args, engine_kwargs

API_KEY_ENV = envs.NANOVLLM_API_KEY.name
EXIT_ENGINE_DIED = 1
logger = logging.getLogger("nanovllm")


def add_serve_parser(sub) -> None:
    p = sub.add_parser(
        "serve", help="OpenAI-compatible HTTP server",
        description="Serve MODEL over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
                    "/v1/models, /tokenize, /detokenize, /health, /metrics), with a web chat at / and a live dashboard "
                    "at /dashboard. See docs/serving.md.",
    )
    add_engine_args(p, model_positional=True)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=None,
                   help=f"require `Authorization: Bearer KEY` on every route but /health and /metrics "
                        f"(default: ${API_KEY_ENV} when set)")
    p.add_argument("--served-model-name", default=None,
                   help="model name clients must send (default: the MODEL argument, or the bundled model's name)")
    p.add_argument("--load-format", choices=("auto", "dummy"), default="auto",
                   help="dummy = random weights (benchmarking without a checkpoint)")
    p.add_argument("--skip-tokenizer-init", action="store_true",
                   help="load no tokenizer: completions take token-id prompts and return token ids, no chat")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="KV-cache blocks (default: sized from memory)")
    p.add_argument("--max-body-bytes", type=int, default=None,
                   help="largest request body accepted; larger ones get 413 (default 10 MiB)")
    p.add_argument("--no-web-ui", dest="web_ui", action="store_false",
                   help="leave out the browser chat (/) and the live dashboard (/dashboard)")
    p.add_argument("--no-coalesce-outputs", dest="coalesce_outputs", action="store_false",
                   help="send every engine step's output as its own chunk even when a stream's response lags "
                        "(default: a lagging stream sends the outputs waiting for it as one chunk; for A/B runs)")
    p.add_argument("--request-timeline", default=None, metavar="PATH",
                   help="record each generation request's timeline (arrival, queued, first scheduled, first token, "
                        "every chunk sent) and write it as CSV to PATH when the server stops; plot it with "
                        "`nanovllm bench timeline PATH` (default: off)")
    p.add_argument("--uvicorn-log-level", default="warning", help="uvicorn's log level (default warning)")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from nanovllm.config import EngineConfig
    from nanovllm.engine.async_engine import AsyncLLMEngine
    from nanovllm.serve.app import DEFAULT_MAX_BODY_BYTES, build_app

    kwargs = engine_kwargs(args)
    if args.num_kv_blocks is not None:
        kwargs["num_kv_blocks"] = args.num_kv_blocks
    config = EngineConfig(model=args.model, skip_tokenizer_init=args.skip_tokenizer_init,
                          load_format=args.load_format, **kwargs)
    api_key = args.api_key or envs.api_key()
    if not api_key and not _is_loopback(args.host):
        logger.warning("serving on %s without an API key: anyone who can reach it can use it", args.host)
    timeline = None
    if args.request_timeline is not None:  # validated before the model loads
        from nanovllm.serve.timeline import RequestTimeline

        timeline = RequestTimeline(args.request_timeline)
    engine = AsyncLLMEngine.from_config(config, coalesce_outputs=args.coalesce_outputs)
    name = args.served_model_name or args.model or engine.model_name
    app = build_app(_with_timeline(engine, timeline), name, api_key=api_key,
                    max_body_bytes=args.max_body_bytes or DEFAULT_MAX_BODY_BYTES, web_ui=args.web_ui)
    if timeline is not None:
        from nanovllm.serve.timeline import TimelineMiddleware

        app.add_middleware(TimelineMiddleware, timeline=timeline)
        # at lifespan shutdown: uvicorn re-raises SIGTERM/SIGINT once it has stopped, so no `finally` would run
        app.router.on_shutdown.append(lambda: print(f"nanovllm serve: request timeline written to "
                                                    f"{timeline.write()}", file=sys.stderr, flush=True))
    print(f"nanovllm serve: {name} on http://{args.host}:{args.port}/v1"
          f"{' (API key required)' if api_key else ''}", file=sys.stderr, flush=True)
    if args.web_ui:
        print(f"nanovllm serve: web chat on http://{args.host}:{args.port}/ and dashboard on "
              f"http://{args.host}:{args.port}/dashboard", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                                           timeout_graceful_shutdown=5))
    engine.on_dead(lambda error: setattr(server, "should_exit", True))  # e.g. a tensor-parallel worker died
    try:
        server.run()
    finally:
        engine.shutdown()
    if engine.dead_error is not None:
        print(f"nanovllm serve: the engine died: {engine.dead_error}", file=sys.stderr, flush=True)
        return EXIT_ENGINE_DIED
    return 0


def _with_timeline(engine, timeline):
    """The engine the routes use: wrapped to note each HTTP request's engine requests when timing."""
    if timeline is None:
        return engine
    from nanovllm.serve.timeline import TimelineEngine

    return TimelineEngine(engine, timeline)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
