"""`nanovllm serve [MODEL]`: the OpenAI-compatible server (uvicorn + build_app).

Every flag is checked before the model loads (`check_serve_args`, run by cli.main): a bad
value costs no model load.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import sys
from typing import Optional

from nanovllm import envs
from nanovllm.cli.args import add_engine_args, engine_args
from nanovllm.engine.arg_utils import positive_int

API_KEY_ENV = envs.NANOVLLM_API_KEY.name
EXIT_ENGINE_DIED = 1
MAX_PORT = 65535
UVICORN_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
logger = logging.getLogger("nanovllm")


def add_serve_parser(sub) -> None:
    from nanovllm.serve.tool_parsers import TOOL_PARSERS

    p = sub.add_parser(
        "serve", help="OpenAI-compatible HTTP server",
        description="Serve MODEL over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
                    "/v1/models, /tokenize, /detokenize, /health, /ping, /version, /metrics), with a web chat at / "
                    "and a live dashboard at /dashboard. See docs/serving.md.",
    )
    add_engine_args(p, model_positional=True)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only)")
    g.add_argument("--port", type=_port, default=8000, help="port (default 8000)")
    g.add_argument("--api-key", default=None,
                   help=f"require `Authorization: Bearer KEY` on every route but /health, /metrics and /ping "
                        f"(visible to other users in `ps`: prefer --api-key-file or ${API_KEY_ENV})")
    g.add_argument("--api-key-file", default=None,
                   help="read the API key from this file (its first line; keeps the key out of `ps` and shell "
                        "history)")
    g.add_argument("--served-model-name", default=None,
                   help="model name clients must send (default: the MODEL argument, or the bundled model's name)")
    g.add_argument("--max-body-bytes", type=positive_int, default=None,
                   help="largest request body accepted; larger ones get 413 (default 10 MiB)")
    g.add_argument("--no-web-ui", dest="web_ui", action="store_false",
                   help="leave out the browser chat (/) and the live dashboard (/dashboard)")
    g.add_argument("--no-coalesce-outputs", dest="coalesce_outputs", action="store_false",
                   help="send every engine step's output as its own chunk even when a stream's response lags "
                        "(default: a lagging stream sends the outputs waiting for it as one chunk; for A/B runs)")
    g.add_argument("--engine-process", action="store_true",
                   help="run the engine (scheduling, steps, detokenization) in a process of its own, so its host "
                        "work does not share the HTTP layer's GIL (default: on a thread of the server's process)")
    g.add_argument("--request-timeline", default=None, metavar="PATH",
                   help="record each generation request's timeline (arrival, queued, first scheduled, first token, "
                        "every chunk sent) and write it as CSV to PATH when the server stops; plot it with "
                        "`nanovllm bench timeline PATH` (default: off)")
    g.add_argument("--uvicorn-log-level", default="warning", choices=UVICORN_LOG_LEVELS,
                   help="uvicorn's log level (default warning)")
    g = p.add_argument_group("chat templates and tools")
    g.add_argument("--chat-template", default=None,
                   help="chat template file (or Jinja text) used instead of the model's, e.g. "
                        "examples/tool_chat_template_chatml.jinja")
    g.add_argument("--tool-call-parser", default=None, choices=sorted(TOOL_PARSERS),
                   help="how tool calls are read from the model's replies (hermes: Qwen / Hermes "
                        "<tool_call> blocks; llama3_json: Llama 3 JSON)")
    g.add_argument("--enable-auto-tool-choice", action="store_true",
                   help='let the model decide when to call tools (tool_choice "auto"); needs --tool-call-parser')
    g = p.add_argument_group("CORS (off unless --allowed-origins is given)")
    g.add_argument("--allowed-origins", type=_string_list, default=None,
                   help='origins allowed to call the API from a browser: JSON list (\'["https://a.example"]\') '
                        'or comma-separated; "*" = any')
    g.add_argument("--allowed-methods", type=_string_list, default=None, help='allowed methods (default ["*"])')
    g.add_argument("--allowed-headers", type=_string_list, default=None, help='allowed headers (default ["*"])')
    g.add_argument("--allowed-credentials", action="store_true", help="allow cookies / credentials")
    add_server_limit_args(p)
    p.set_defaults(func=cmd_serve, check=check_serve_args, _parser=p)


def check_serve_args(args: argparse.Namespace) -> None:
    """Everything that can be wrong with the flags, before the model loads (ValueError)."""
    from nanovllm.entrypoints.chat_utils import load_chat_template
    from nanovllm.serve.tools import check_tool_parser

    args.chat_template_text = load_chat_template(args.chat_template)
    check_tool_parser(args.tool_call_parser, args.enable_auto_tool_choice)
    if args.allowed_origins is None and (args.allowed_methods or args.allowed_headers or args.allowed_credentials):
        raise ValueError("--allowed-methods / --allowed-headers / --allowed-credentials need --allowed-origins "
                         "(CORS is off without it)")
    if args.allowed_credentials and "*" in (args.allowed_origins or []):
        raise ValueError("--allowed-credentials cannot be combined with --allowed-origins '*': list the origins")
    args.api_key_value = resolve_api_key(args)
    args.server_settings = server_settings(args)


def add_server_limit_args(p: argparse.ArgumentParser) -> None:
    """Connection limits and the drain (nanovllm/serve/server.py, docs/serving.md)."""
    from nanovllm.serve.settings import (
        DEFAULT_KEEP_ALIVE_S, DEFAULT_LIMIT_CONCURRENCY, DEFAULT_READ_TIMEOUT_S, DEFAULT_SHUTDOWN_TIMEOUT_S,
    )

    g = p.add_argument_group("connections and shutdown")
    g.add_argument("--shutdown-timeout", type=float, default=DEFAULT_SHUTDOWN_TIMEOUT_S,
                   help=f"on SIGTERM/SIGINT, let running requests finish for this many seconds, then end each "
                        f"cleanly (streams: an error event and [DONE]; others: 503) (default "
                        f"{DEFAULT_SHUTDOWN_TIMEOUT_S:g})")
    g.add_argument("--read-timeout", type=float, default=DEFAULT_READ_TIMEOUT_S,
                   help=f"close a connection whose request head does not arrive within this many seconds, "
                        f"answer 408 when its body does not (default {DEFAULT_READ_TIMEOUT_S:g}; 0 = no limit)")
    g.add_argument("--timeout-keep-alive", type=int, default=DEFAULT_KEEP_ALIVE_S,
                   help=f"close idle keep-alive connections after this many seconds (default {DEFAULT_KEEP_ALIVE_S})")
    g.add_argument("--limit-concurrency", type=int, default=None,
                   help=f"most open connections / requests; beyond it new requests get 503 (default "
                        f"{DEFAULT_LIMIT_CONCURRENCY}, lowered to fit `ulimit -n`)")


def server_settings(args: argparse.Namespace):
    from nanovllm.serve.settings import ServerSettings

    return ServerSettings(shutdown_timeout=args.shutdown_timeout, read_timeout=args.read_timeout or None,
                          keep_alive_timeout=args.timeout_keep_alive, limit_concurrency=args.limit_concurrency)


def resolve_api_key(args: argparse.Namespace) -> Optional[str]:
    """The key from --api-key, --api-key-file or $NANOVLLM_API_KEY (in that order); None = no auth.

    An empty key is an error wherever it comes from: it would otherwise silently turn
    authentication off (e.g. `--api-key "$UNSET_VARIABLE"`).
    """
    if args.api_key is not None and args.api_key_file is not None:
        raise ValueError("give --api-key or --api-key-file, not both")
    if args.api_key is not None:
        if not args.api_key.strip():
            raise ValueError("--api-key is empty: give a key, or leave the flag out to serve without one")
        logger.warning("the API key on the command line is visible to other users in `ps`; prefer --api-key-file "
                       "or $%s", API_KEY_ENV)
        return args.api_key.strip()
    if args.api_key_file is not None:
        try:
            with open(args.api_key_file, encoding="utf-8") as f:
                key = f.readline().strip()
        except OSError as e:
            raise ValueError(f"--api-key-file {args.api_key_file}: cannot read it ({e.strerror})") from None
        if not key:
            raise ValueError(f"--api-key-file {args.api_key_file}: the first line is empty; put the key there")
        return key
    key = envs.NANOVLLM_API_KEY.get()  # raw: an empty value is refused here, not taken as "no key"
    if key is not None and not key.strip():
        raise ValueError(f"${API_KEY_ENV} is set but empty: set it to a key, or unset it to serve without one")
    return key.strip() if key is not None else None


def cmd_serve(args: argparse.Namespace) -> int:
    from nanovllm.engine.async_engine import AsyncLLMEngine
    from nanovllm.serve.app import DEFAULT_MAX_BODY_BYTES, CorsSettings, build_app
    from nanovllm.serve.server import make_server

    if not hasattr(args, "chat_template_text"):  # called without cli.main's checks
        check_serve_args(args)
    config = engine_args(args).create_engine_config()
    api_key, settings = args.api_key_value, args.server_settings
    if not api_key and not _is_loopback(args.host):
        logger.warning("serving on %s without an API key: anyone who can reach it can use it", args.host)
    cors = None
    if args.allowed_origins is not None:
        cors = CorsSettings(args.allowed_origins, args.allowed_methods or ["*"], args.allowed_headers or ["*"],
                            args.allowed_credentials)
    timeline = None
    if args.request_timeline is not None:  # validated before the model loads
        from nanovllm.serve.timeline import RequestTimeline

        timeline = RequestTimeline(args.request_timeline)
    engine = AsyncLLMEngine.from_config(config, coalesce_outputs=args.coalesce_outputs)
    name = args.served_model_name or args.model or engine.model_name
    app = build_app(_with_timeline(engine, timeline), name, api_key=api_key,
                    max_body_bytes=args.max_body_bytes or DEFAULT_MAX_BODY_BYTES,
                    read_timeout=settings.read_timeout, chat_template=args.chat_template_text,
                    tool_parser=args.tool_call_parser, enable_auto_tool_choice=args.enable_auto_tool_choice,
                    cors=cors, web_ui=args.web_ui)
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
    server = make_server(app, engine, args.host, args.port, settings, args.uvicorn_log_level)
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


# ----------------------------------------------------------------------------- argparse value types
def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= MAX_PORT:
        raise argparse.ArgumentTypeError(f"port {value} is outside [0, {MAX_PORT}]")
    return value


def _string_list(text: str) -> Optional[list[str]]:
    """A JSON list of strings (vLLM's form) or a comma-separated list."""
    text = text.strip()
    if text.startswith("["):
        try:
            values = json.loads(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"not a JSON list: {e}") from None
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise argparse.ArgumentTypeError("expected a JSON list of strings")
        return values
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError("expected at least one value")
    return values
