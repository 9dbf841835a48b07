"""Triton kernels may read module globals only when they are `tl.constexpr`.

The CPU interpreter (TRITON_INTERPRET=1) runs kernels as Python and accepts a plain `FOO = 3`
read inside `@triton.jit`; the GPU compiler rejects it with a NameError. CPU CI would pass and
every GPU launch of that kernel fail, so this test checks the rule without a GPU: every global
name a kernel reads must be a constexpr, a module, a function or another kernel.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import types

import pytest

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

import nanovllm.kernels  # noqa: E402

PLAIN_VALUES = (int, float, bool, str, bytes, tuple, list, dict)


def _kernel_modules() -> list[types.ModuleType]:
    return [importlib.import_module(f"nanovllm.kernels.{m.name}")
            for m in pkgutil.iter_modules(nanovllm.kernels.__path__)]


def _is_kernel(obj) -> bool:
    # `triton.jit` gives a JITFunction, or an InterpretedFunction under TRITON_INTERPRET=1
    return type(obj).__name__ in ("JITFunction", "InterpretedFunction") and inspect.isfunction(getattr(obj, "fn", None))


def _jit_functions(module: types.ModuleType) -> list:
    return [obj for _, obj in inspect.getmembers(module)
            if _is_kernel(obj) and obj.fn.__module__ == module.__name__]


def _plain_globals_read(kernel) -> list[str]:
    """Names the kernel's code reads that resolve to a plain Python value in its module."""
    fn = kernel.fn
    params = set(inspect.signature(fn).parameters)
    bad = []
    for name in fn.__code__.co_names:
        if name in params or name not in fn.__globals__:
            continue
        value = fn.__globals__[name]
        if isinstance(value, PLAIN_VALUES) and not isinstance(value, tl.constexpr):
            bad.append(f"{name} = {value!r}")
    return bad


def test_every_kernel_module_has_kernels_to_check():
    assert sum(len(_jit_functions(m)) for m in _kernel_modules()) >= 10


@pytest.mark.parametrize("module", _kernel_modules(), ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_kernels_read_only_constexpr_globals(module):
    offenders = {k.fn.__name__: bad for k in _jit_functions(module) if (bad := _plain_globals_read(k))}
    assert not offenders, (f"{module.__name__}: kernels read plain globals, which the GPU compiler "
                           f"rejects (wrap them in tl.constexpr): {offenders}")
