"""The OpenAI-compatible HTTP app: `build_app(engine, served_model_name, api_key=None, ...)`.

    GET  /v1/models                 POST /v1/completions        POST /v1/chat/completions
    POST /tokenize                  POST /detokenize            GET  /version
    GET  /health   GET /metrics     GET|POST /ping              (never behind the API key)
    GET  /  GET /dashboard  GET /ui/*   the web chat and dashboard (web.py; pages open, data behind the key)

A thin layer: protocol.py validates the JSON, completions.py / chat.py turn it into engine
requests, AsyncLLMEngine runs them. Every error is answered in OpenAI's shape
{"error": {"message", "type", "param", "code"}}. A client that disconnects, streaming or
not, has its requests aborted (their KV blocks are freed on the engine's next iteration).
Every response carries `X-Request-Id`: the client's (it also names the completion, e.g.
`chatcmpl-<id>`), else a fresh one. CORS is off unless `cors` (--allowed-origins) is given.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import uuid
from contextlib import suppress
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Optional

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanovllm.engine.async_engine import AsyncLLMEngine, EngineDeadError, RequestFailedError
from nanovllm.serve.chat import OpenAIServingChat
from nanovllm.serve.completions import OpenAIServingCompletion
from nanovllm.serve.metrics import CONTENT_TYPE, ServerMetrics
from nanovllm.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    error_body,
)
from nanovllm.serve.web import add_web_ui, is_web_path

logger = logging.getLogger("nanovllm")

DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024
PUBLIC_PATHS = frozenset({"/health", "/metrics", "/ping"})  # open even when an API key is set
CLIENT_CLOSED_REQUEST = 499  # nginx's status for "client went away"; never actually delivered
REQUEST_ID_HEADER = "X-Request-Id"
# a client's X-Request-Id is used when it is this tame (it ends up in ids and logs)
REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")


@dataclass(frozen=True)
class CorsSettings:
    """CORS for browsers (vLLM's --allowed-origins / --allowed-methods / --allowed-headers)."""

    allowed_origins: list[str]
    allowed_methods: list[str] = field(default_factory=lambda: ["*"])
    allowed_headers: list[str] = field(default_factory=lambda: ["*"])
    allow_credentials: bool = False


def build_app(engine: AsyncLLMEngine, served_model_name: Optional[str] = None, api_key: Optional[str] = None,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, web_ui: bool = True,
              read_timeout: Optional[float] = None, *, chat_template: Optional[str] = None,
              tool_parser: Optional[str] = None, enable_auto_tool_choice: bool = False,
              cors: Optional[CorsSettings] = None) -> FastAPI:
    """FastAPI app serving `engine` under `served_model_name` (default: the engine's model name).

    With `api_key`, every route but /health, /metrics, /ping and the web pages needs
    `Authorization: Bearer <key>`. Bodies larger than `max_body_bytes` get 413; bodies not
    complete within `read_timeout` seconds of the request head get 408. `web_ui` adds the chat
    page (/) and the dashboard (/dashboard). `chat_template` (Jinja text) replaces the model's;
    `tool_parser` reads tool calls from replies when tool_choice is auto (only with
    `enable_auto_tool_choice`, as in vLLM).
    """
    from nanovllm import __version__

    if api_key is not None and not api_key.strip():
        raise ValueError("api_key is empty: give a key, or None to serve without authentication")
    name = served_model_name or engine.model_name
    completion = OpenAIServingCompletion(engine, name)
    chat = OpenAIServingChat(engine, name, chat_template, tool_parser, enable_auto_tool_choice)
    metrics = ServerMetrics(engine, name)
    engine.add_observer(metrics)

    app = FastAPI(title="nanovllm", description="OpenAI-compatible server of nanovllm", version=__version__)
    app.state.engine = engine
    app.state.metrics = metrics
    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=max_body_bytes, read_timeout=read_timeout,
                       is_public=_with_web_paths if web_ui else PUBLIC_PATHS.__contains__)
    app.add_middleware(_RequestId)
    if cors is not None:  # outermost: preflights and error answers get the CORS headers too
        app.add_middleware(CORSMiddleware, allow_origins=cors.allowed_origins, allow_methods=cors.allowed_methods,
                           allow_headers=cors.allowed_headers, allow_credentials=cors.allow_credentials,
                           expose_headers=[REQUEST_ID_HEADER])
    _add_error_handlers(app)
    if web_ui:
        add_web_ui(app)

    def check_model(model: Optional[str]) -> None:
        if model is not None and model != name:
            raise APIError(f"the model `{model}` does not exist; this server serves `{name}`",
                           HTTPStatus.NOT_FOUND, param="model")

    def card() -> ModelCard:
        return ModelCard(id=name, root=engine.model_name, max_model_len=engine.max_model_len)

    @app.get("/health")
    async def health() -> Response:
        if not engine.is_running:
            return _error(f"the engine is not running ({engine.dead_error or 'shut down'})",
                          HTTPStatus.SERVICE_UNAVAILABLE)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def get_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.api_route("/ping", methods=["GET", "POST"])
    async def ping() -> Response:  # vLLM's (SageMaker's) liveness route: /health's answer
        return await health()

    @app.get("/version")
    async def version() -> Response:
        return JSONResponse({"version": __version__})

    @app.get("/v1/models")
    async def list_models() -> Response:
        return _json(ModelList(data=[card()]))

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> Response:
        check_model(model)
        return _json(card())

    @app.post("/v1/completions")
    async def create_completion(body: CompletionRequest, raw: Request) -> Response:
        check_model(body.model)
        return await _respond(raw, completion.create(body, _client_request_id(raw)))

    @app.post("/v1/chat/completions")
    async def create_chat_completion(body: ChatCompletionRequest, raw: Request) -> Response:
        check_model(body.model)
        return await _respond(raw, chat.create(body, _client_request_id(raw)))

    def require_tokenizer():
        if engine.tokenizer is None:
            raise APIError("this server runs without a tokenizer (--skip-tokenizer-init)")
        return engine.tokenizer

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> Response:
        check_model(body.model)
        require_tokenizer()
        if (body.prompt is None) == (body.messages is None):
            raise APIError("give exactly one of `prompt` (text) or `messages` (chat)", param="prompt")
        if body.messages is not None:
            tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
            ids = await chat.render_async(body.messages, body.add_generation_prompt, tools=tools,
                                          chat_template=body.chat_template,
                                          chat_template_kwargs=body.chat_template_kwargs,
                                          continue_final_message=body.continue_final_message)
        else:
            [ids] = await engine.tokenize([body.prompt], add_special_tokens=body.add_special_tokens)
        return _json(TokenizeResponse(count=len(ids), max_model_len=engine.max_model_len, tokens=ids))

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> Response:
        check_model(body.model)
        tok = require_tokenizer()
        bad = [t for t in body.tokens if not 0 <= t < engine.vocab_size]
        if bad:
            raise APIError(f"token id {bad[0]} is outside the vocabulary [0, {engine.vocab_size})", param="tokens")
        return _json(DetokenizeResponse(prompt=await engine.preprocess(tok.decode, body.tokens)))

    return app


def _with_web_paths(path: str) -> bool:
    return path in PUBLIC_PATHS or is_web_path(path)


# ---------------------------------------------------------------------- request ids
def _client_request_id(raw: Request) -> str:
    return raw.scope.get("state", {}).get("request_id") or uuid.uuid4().hex


class _RequestId:
    """ASGI middleware: honour a tame X-Request-Id (else make one) and echo it on the response."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(REQUEST_ID_HEADER.lower().encode(), b"").decode("latin-1")
        request_id = given if REQUEST_ID_PATTERN.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", request_id.encode()))
                message = dict(message, headers=headers)
            await send(message)

        await self.app(scope, receive, send_with_id)


# ---------------------------------------------------------------------- responses
def _json(model: BaseModel, status: int = 200) -> Response:
    return Response(model.model_dump_json(), status_code=status, media_type="application/json")


def _error(message: str, status: int, param: Optional[str] = None) -> JSONResponse:
    return JSONResponse(error_body(message, status, param), status_code=int(status))


class _SSEResponse(StreamingResponse):
    """text/event-stream whose body generator is always closed (so its requests are aborted)."""

    media_type = "text/event-stream"

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            with suppress(RuntimeError):  # already finished, or closing while running
                await self.body_iterator.aclose()


async def _respond(raw: Request, work) -> Response:
    """Await a serving coroutine; abort it if the client disconnects first.

    The coroutine returns a pydantic response, or an async iterator of SSE lines once the
    requests were accepted (errors before that are still plain HTTP errors). The SSE
    response watches for the disconnect itself.
    """
    result = await _cancel_on_disconnect(raw, work)
    if result is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    if isinstance(result, BaseModel):
        return _json(result)
    return _SSEResponse(result, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _cancel_on_disconnect(raw: Request, coro) -> Any:
    task = asyncio.ensure_future(coro)
    watcher = asyncio.ensure_future(_wait_for_disconnect(raw))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()  # the client is gone (or we were cancelled): abort its requests
            with suppress(asyncio.CancelledError):
                await task
    return task.result() if not task.cancelled() else None


async def _wait_for_disconnect(raw: Request) -> None:
    # The body was already read (FastAPI parsed it): the next message is the disconnect.
    while True:
        message = await raw.receive()
        if message["type"] == "http.disconnect":
            return


# ---------------------------------------------------------------------- errors
def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, e: RequestValidationError):
        message, param = _validation_message(e.errors())
        return _error(message, HTTPStatus.BAD_REQUEST, param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, e: StarletteHTTPException):
        return _error(str(e.detail), e.status_code)

    @app.exception_handler(ValueError)
    @app.exception_handler(TypeError)
    async def bad_input(_, e: Exception):  # from the engine's checks, which name the field as .param
        return _error(str(e), HTTPStatus.BAD_REQUEST, getattr(e, "param", None))

    @app.exception_handler(RequestFailedError)
    async def request_failed(_, e: RequestFailedError):
        return _error(str(e), HTTPStatus.INTERNAL_SERVER_ERROR)

    @app.exception_handler(EngineDeadError)
    async def engine_dead(_, e: EngineDeadError):
        return _error(str(e), HTTPStatus.SERVICE_UNAVAILABLE)

    @app.exception_handler(Exception)
    async def internal_error(_, e: Exception):
        logger.exception("unhandled error in the HTTP layer")
        return _error(f"internal server error ({type(e).__name__})", HTTPStatus.INTERNAL_SERVER_ERROR)


def _validation_message(errors) -> tuple[str, Optional[str]]:
    """One readable line from pydantic errors, naming the field(s); plus the first field as `param`."""
    by_field: dict[str, list[dict]] = {}
    for err in errors:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            detail = (err.get("ctx") or {}).get("error", err.get("msg", ""))
            return f"malformed JSON body: {detail}", None
        if not loc:
            return "the request body must be a JSON object, sent with Content-Type: application/json", None
        by_field.setdefault(loc[0], []).append(dict(err, loc=loc))
    parts = []
    for field, errs in by_field.items():
        # our own checks (e.g. a lone surrogate) say more than "no branch of the union matched"
        first = next((e for e in errs if e.get("type") == "value_error"), errs[0])
        if first.get("type") == "value_error":
            parts.append(str(first.get("msg", "invalid value")).removeprefix("Value error, "))
            continue
        if first.get("type") == "extra_forbidden":
            parts.append(f"unknown field `{'.'.join(first['loc'])}` (not part of this API, or not supported)")
        elif first.get("type") == "missing":
            parts.append(f"`{'.'.join(first['loc'])}` is required")
        elif len(errs) > 1 and all(len(e["loc"]) > 1 for e in errs):  # a union: no branch matched
            parts.append(f"`{field}` has the wrong type ({type(first.get('input')).__name__}); see the API "
                         f"reference for the accepted shapes")
        else:
            got = repr(first.get("input"))
            got = got if len(got) <= 40 else got[:37] + "..."
            parts.append(f"`{'.'.join(first['loc'])}`: {first.get('msg', 'invalid value')} (got {got})")
    return "invalid request: " + "; ".join(parts), next(iter(by_field), None)


class _Guard:
    """ASGI middleware: 401 without the API key (before any parsing), 413 for bodies over the
    limit, 408 for bodies that do not arrive in time."""

    def __init__(self, app, api_key: Optional[str], max_body_bytes: int, read_timeout: Optional[float] = None,
                 is_public=PUBLIC_PATHS.__contains__) -> None:
        self.app = app
        self.is_public = is_public  # path -> True when it needs no key
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.read_timeout = read_timeout

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.api_key is not None and not self.is_public(scope.get("path", "")) and scope.get("method") != "OPTIONS":
            auth = headers.get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key):
                return await _send_error(send, "missing or wrong API key: send `Authorization: Bearer <key>`",
                                         HTTPStatus.UNAUTHORIZED)
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return await _send_error(send, f"request body of {int(length)} bytes is larger than the limit of "
                                           f"{self.max_body_bytes} bytes", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        received = 0
        limit, timeout = self.max_body_bytes, self.read_timeout
        body_done = False

        async def limited_receive():  # counts bodies without Content-Length (chunked) too
            nonlocal received, body_done
            if body_done or timeout is None:
                message = await receive()  # e.g. waiting for the client's disconnect: no limit
            else:
                try:
                    message = await asyncio.wait_for(receive(), timeout)
                except asyncio.TimeoutError:
                    raise HTTPException(HTTPStatus.REQUEST_TIMEOUT,
                                        f"the request body did not arrive within {timeout:g} s") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > limit:
                    raise HTTPException(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                        f"request body is larger than the limit of {limit} bytes")
            return message

        await self.app(scope, limited_receive, send)


async def _send_error(send, message: str, status: int) -> None:
    body = json.dumps(error_body(message, status)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == HTTPStatus.UNAUTHORIZED:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": int(status), "headers": headers})
    await send({"type": "http.response.body", "body": body})
