"""Starting processes with multiprocessing's "spawn" without re-running the user's script in them
(tensor-parallel workers, worker_procs.py; the engine process, engine/engine_process.py).
Torch-free, so the engine's modules can use it without importing torch."""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator


@contextlib.contextmanager
def main_module_not_rerun() -> Iterator[None]:
    """While workers start: multiprocessing's "spawn" re-runs `__main__` in each child when it
    has a file (`__spec__` None) or imports it by name (`python -m`); hide both so the child
    only unpickles nanovllm objects. Restored at once: `start()` reads them synchronously."""
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    missing = object()
    saved = {name: getattr(main, name, missing) for name in ("__spec__", "__file__")}
    try:
        main.__spec__ = None
        if saved["__file__"] is not missing:
            del main.__file__
        yield
    finally:
        for name, value in saved.items():
            if value is not missing:
                setattr(main, name, value)
