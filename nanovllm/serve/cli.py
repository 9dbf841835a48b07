"""`nanovllm serve [MODEL]`: the OpenAI-compatible server (uvicorn + build_app)."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from typing import Optional

from nanovllm.cli.main import add_engine_args, engine_kwargs

API_KEY_ENV = "NANOVLLM_API_KEY"
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
                        f"(visible to other users in `ps`: prefer --api-key-file or ${API_KEY_ENV})")
    p.add_argument("--api-key-file", default=None,
                   help="read the API key from this file (its first line; keeps the key out of `ps` and shell "
                        "history)")
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
    p.add_argument("--uvicorn-log-level", default="warning", help="uvicorn's log level (default warning)")
    add_server_limit_args(p)
    p.set_defaults(func=cmd_serve)


def add_server_limit_args(p: argparse.ArgumentParser) -> None:
    """Connection limits and the drain (nanovllm/serve/server.py, docs/serving.md)."""
    from nanovllm.serve.settings import (
        DEFAULT_KEEP_ALIVE_S, DEFAULT_LIMIT_CONCURRENCY, DEFAULT_READ_TIMEOUT_S, DEFAULT_SHUTDOWN_TIMEOUT_S,
    )

    p.add_argument("--shutdown-timeout", type=float, default=DEFAULT_SHUTDOWN_TIMEOUT_S,
                   help=f"on SIGTERM/SIGINT, let running requests finish for this many seconds, then end each "
                        f"cleanly (streams: an error event and [DONE]; others: 503) (default "
                        f"{DEFAULT_SHUTDOWN_TIMEOUT_S:g})")
    p.add_argument("--read-timeout", type=float, default=DEFAULT_READ_TIMEOUT_S,
                   help=f"close a connection whose request head does not arrive within this many seconds, "
                        f"answer 408 when its body does not (default {DEFAULT_READ_TIMEOUT_S:g}; 0 = no limit)")
    p.add_argument("--timeout-keep-alive", type=int, default=DEFAULT_KEEP_ALIVE_S,
                   help=f"close idle keep-alive connections after this many seconds (default {DEFAULT_KEEP_ALIVE_S})")
    p.add_argument("--limit-concurrency", type=int, default=None,
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
    key = os.environ.get(API_KEY_ENV)  # the one place the variable is read (moves to nanovllm/envs.py)
    if key is not None and not key.strip():
        raise ValueError(f"${API_KEY_ENV} is set but empty: set it to a key, or unset it to serve without one")
    return key.strip() if key is not None else None


def cmd_serve(args: argparse.Namespace) -> int:
    from nanovllm.config import EngineConfig
    from nanovllm.engine.async_engine import AsyncLLMEngine
    from nanovllm.serve.app import DEFAULT_MAX_BODY_BYTES, build_app
    from nanovllm.serve.server import make_server

    kwargs = engine_kwargs(args)
    if args.num_kv_blocks is not None:
        kwargs["num_kv_blocks"] = args.num_kv_blocks
    config = EngineConfig(model=args.model, skip_tokenizer_init=args.skip_tokenizer_init,
                          extra={"load_format": args.load_format}, **kwargs)
    api_key = resolve_api_key(args)
    settings = server_settings(args)
    if not api_key and not _is_loopback(args.host):
        logger.warning("serving on %s without an API key: anyone who can reach it can use it", args.host)
    engine = AsyncLLMEngine.from_config(config)
    name = args.served_model_name or args.model or engine.model_name
    app = build_app(engine, name, api_key=api_key, max_body_bytes=args.max_body_bytes or DEFAULT_MAX_BODY_BYTES,
                    read_timeout=settings.read_timeout, web_ui=args.web_ui)
    print(f"nanovllm serve: {name} on http://{args.host}:{args.port}/v1"
          f"{' (API key required)' if api_key else ''}", file=sys.stderr, flush=True)
    if args.web_ui:
        print(f"nanovllm serve: web chat on http://{args.host}:{args.port}/ and dashboard on "
              f"http://{args.host}:{args.port}/dashboard", file=sys.stderr, flush=True)
    try:
        make_server(app, engine, args.host, args.port, settings, args.uvicorn_log_level).run()
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
