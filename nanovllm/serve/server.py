"""Run the app under uvicorn with what a server exposed to many clients needs.

- Read timeout: a connection must deliver a complete request head within `read_timeout`
  seconds of connecting (or of its previous response), else it is closed; the body must then
  arrive within `read_timeout` too, else 408 (app.py's guard). uvicorn itself only times out
  idle keep-alive connections, so half-open connections (slowloris) were held forever.
- Keep-alive timeout: uvicorn's `timeout_keep_alive`.
- Connection limit: uvicorn's `limit_concurrency`; beyond it new requests get uvicorn's 503.
  The default stays below the process's open-file limit, so accept() never fails for lack of
  descriptors.
- Graceful drain (SIGTERM, SIGINT): the listening socket closes, /health answers 503 and new
  requests get 503; running requests may finish for `shutdown_timeout` seconds, then each
  one still running ends cleanly: a stream gets an error event and `data: [DONE]`, a
  non-streamed request a 503. uvicorn is given a few seconds more to flush those answers.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Optional

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from nanovllm.serve.settings import ServerSettings

if TYPE_CHECKING:
    from nanovllm.engine.async_engine import AsyncLLMEngine

logger = logging.getLogger("nanovllm")

DRAIN_FLUSH_S = 5.0  # after the drain: time for the error events / 503s to reach the clients


def read_timeout_protocol(timeout: float) -> type:
    """uvicorn's HTTP protocol class (httptools or h11), closing connections whose request head
    does not arrive within `timeout` seconds."""

    class ReadTimeoutProtocol(AutoHTTPProtocol):
        _head_timer: Optional[asyncio.TimerHandle] = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_head_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_head_timer()

        def connection_lost(self, exc) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

        def _arm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete:
                return  # a pipelined request already started; re-armed when it completes
            self._head_timer = self.loop.call_later(timeout, self._head_timeout, cycle)

        def _head_timeout(self, cycle_when_armed) -> None:
            self._head_timer = None
            if self.cycle is cycle_when_armed and not self.transport.is_closing():
                self.transport.close()  # no new request head arrived in time

    return ReadTimeoutProtocol


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose shutdown drains the engine (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, engine: AsyncLLMEngine, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.engine = engine
        self.shutdown_timeout = shutdown_timeout

    async def shutdown(self, sockets=None) -> None:
        engine, timeout = self.engine, self.shutdown_timeout
        stats = engine.stats()
        logger.warning("nanovllm serve: shutting down; draining %d running and %d waiting requests for up to %g s",
                       stats["num_running"], stats["num_waiting"], timeout)
        engine.stop_accepting("the server is shutting down: send the request to another replica or retry later")
        expire = asyncio.get_running_loop().call_later(
            timeout, engine.abort_all,
            f"the server is shutting down and this request did not finish within the {timeout:g} s drain "
            f"(--shutdown-timeout)")
        try:
            await super().shutdown(sockets)
        finally:
            expire.cancel()


def make_server(app, engine: AsyncLLMEngine, host: str, port: int, settings: ServerSettings,
                log_level: str = "warning") -> DrainingServer:
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level,
        http=read_timeout_protocol(settings.read_timeout) if settings.read_timeout is not None else "auto",
        timeout_keep_alive=settings.keep_alive_timeout,
        limit_concurrency=settings.connection_limit,
        timeout_graceful_shutdown=settings.shutdown_timeout + DRAIN_FLUSH_S,
    )
    return DrainingServer(config, engine, settings.shutdown_timeout)
