"""Connection limits and drain time of `nanovllm serve` (applied by server.py; no uvicorn here,
so the CLI can build its parser without importing the server)."""

from __future__ import annotations

import resource
from dataclasses import dataclass
from typing import Optional

DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0
DEFAULT_READ_TIMEOUT_S = 30.0
DEFAULT_KEEP_ALIVE_S = 5  # uvicorn's own default
DEFAULT_LIMIT_CONCURRENCY = 1024
FD_RESERVE = 64  # descriptors kept for model files, logs, the tokenizer's threads...


@dataclass(frozen=True)
class ServerSettings:
    """Connection-level limits of `nanovllm serve` (what each does: nanovllm/serve/server.py)."""

    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT_S
    read_timeout: Optional[float] = DEFAULT_READ_TIMEOUT_S  # None: no limit
    keep_alive_timeout: int = DEFAULT_KEEP_ALIVE_S
    limit_concurrency: Optional[int] = None  # None: default_limit_concurrency()

    def __post_init__(self) -> None:
        if not self.shutdown_timeout >= 0:
            raise ValueError(f"--shutdown-timeout {self.shutdown_timeout} must be >= 0 seconds")
        if self.read_timeout is not None and not self.read_timeout > 0:
            raise ValueError(f"--read-timeout {self.read_timeout} must be > 0 seconds (0 on the command line = off)")
        if self.keep_alive_timeout < 1:
            raise ValueError(f"--timeout-keep-alive {self.keep_alive_timeout} must be >= 1 second")
        if self.limit_concurrency is not None and self.limit_concurrency < 1:
            raise ValueError(f"--limit-concurrency {self.limit_concurrency} must be >= 1")

    @property
    def connection_limit(self) -> int:
        return self.limit_concurrency if self.limit_concurrency is not None else default_limit_concurrency()


def default_limit_concurrency() -> int:
    """DEFAULT_LIMIT_CONCURRENCY, lowered to fit the open-file limit (`ulimit -n`)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return DEFAULT_LIMIT_CONCURRENCY
    return max(1, min(DEFAULT_LIMIT_CONCURRENCY, soft - FD_RESERVE))
