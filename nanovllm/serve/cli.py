"""`nanovllm serve [MODEL]`: the OpenAI-compatible server (uvicorn + build_app).

Every flag is checked before the model loads (`check_serve_args`, run by cli.main): a bad
value costs no model load.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import sys
from typing import Optional

from nanovllm.cli.main import add_engine_args, engine_args

API_KEY_ENV = "NANOVLLM_API_KEY"
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
                        f"(default: ${API_KEY_ENV} when set)")
    g.add_argument("--served-model-name", default=None,
                   help="model name clients must send (default: the MODEL argument, or the bundled model's name)")
    g.add_argument("--max-body-bytes", type=_positive_int, default=None,
                   help="largest request body accepted; larger ones get 413 (default 10 MiB)")
    g.add_argument("--no-web-ui", dest="web_ui", action="store_false",
                   help="leave out the browser chat (/) and the live dashboard (/dashboard)")
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


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from nanovllm.engine.async_engine import AsyncLLMEngine
    from nanovllm.serve.app import DEFAULT_MAX_BODY_BYTES, CorsSettings, build_app

    if not hasattr(args, "chat_template_text"):  # called without cli.main's checks
        check_serve_args(args)
    config = engine_args(args).create_engine_config()
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if not api_key and not _is_loopback(args.host):
        logger.warning("serving on %s without an API key: anyone who can reach it can use it", args.host)
    cors = None
    if args.allowed_origins is not None:
        cors = CorsSettings(args.allowed_origins, args.allowed_methods or ["*"], args.allowed_headers or ["*"],
                            args.allowed_credentials)
    engine = AsyncLLMEngine.from_config(config)
    name = args.served_model_name or args.model or engine.model_name
    app = build_app(engine, name, api_key=api_key, max_body_bytes=args.max_body_bytes or DEFAULT_MAX_BODY_BYTES,
                    chat_template=args.chat_template_text, tool_parser=args.tool_call_parser,
                    enable_auto_tool_choice=args.enable_auto_tool_choice, cors=cors, web_ui=args.web_ui)
    print(f"nanovllm serve: {name} on http://{args.host}:{args.port}/v1"
          f"{' (API key required)' if api_key else ''}", file=sys.stderr, flush=True)
    if args.web_ui:
        print(f"nanovllm serve: web chat on http://{args.host}:{args.port}/ and dashboard on "
              f"http://{args.host}:{args.port}/dashboard", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                    timeout_graceful_shutdown=5)
    finally:
        engine.shutdown()
    return 0


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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
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
