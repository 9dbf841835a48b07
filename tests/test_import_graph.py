"""The package's import graph, read with ast (module-level and function-level imports alike).

Imports point down only: serve/cli/entrypoints/bench -> engine -> worker -> loading ->
models -> layers -> kernels; config, sampling_params, outputs and envs import nothing of
nanovllm; step_io (the engine <-> worker contract) imports only those leaves. No cycle
between files.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "nanovllm"

# Floors, top to bottom; a module may import its own floor or any floor below it.
FLOORS = [
    {"serve", "cli", "entrypoints", "bench", "__init__"},
    {"engine"},
    {"worker"},
    {"loading"},
    {"models"},
    {"layers"},
    {"kernels"},
    {"step_io"},
    {"config", "sampling_params", "outputs", "envs"},
]
LEAVES = {"config", "sampling_params", "outputs", "envs"}
# The explicit bans, checked on their own so that the message names the rule.
FORBIDDEN = {
    "engine": {"layers", "kernels", "models"},
    "kernels": {"engine", "worker", "models", "layers", "loading"},
    "layers": {"models", "worker", "engine", "loading"},
    "serve": {"worker", "models", "layers", "kernels"},
    "step_io": {"engine", "worker", "models", "layers", "kernels", "loading"},
}
# Engine files must not need the model code's heavy dependencies directly.
ENGINE_BANNED_THIRD_PARTY = {"torch", "triton"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE_DIR.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def _resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([target] if target else []))


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """nanovllm modules imported anywhere in the file (each `from X import Y` counts Y when
    Y is itself a module, else X)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "nanovllm":
                    found.add(_closest_module(alias.name, modules))
        elif isinstance(node, ast.ImportFrom):
            target = node.module
            if node.level:
                target = _resolve_relative(name, path.name == "__init__.py", node.level, node.module)
            if not target or target.split(".")[0] != "nanovllm":
                continue
            for alias in node.names:
                full = f"{target}.{alias.name}"
                found.add(full if full in modules else _closest_module(target, modules))
    found.discard(name)
    return found


def _third_party_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module.split(".")[0])
    return out


def _closest_module(name: str, modules: dict[str, Path]) -> str:
    while name not in modules and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _area(module: str) -> str:
    """'nanovllm.engine.scheduler' -> 'engine'; 'nanovllm.config' -> 'config'; 'nanovllm' -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _floor(area: str) -> int:
    for i, floor in enumerate(FLOORS):
        if area in floor:
            return i
    raise AssertionError(f"package area {area!r} has no floor in tests/test_import_graph.py: place it")


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_every_import_is_found(graph):
    """The reader sees the imports that matter (guards the test itself)."""
    assert "nanovllm.worker.executor" in graph["nanovllm.engine.llm_engine"]
    assert "nanovllm.worker.worker" in graph["nanovllm.worker.executor"]  # a function-level import
    assert "nanovllm.kernels.gemv" in graph["nanovllm.layers.linear"]  # a function-level import


def test_no_cycles_between_files(graph):
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    cycles = []

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_forbidden_directions(graph):
    bad = [f"{src} -> {dst}" for src, deps in sorted(graph.items()) for dst in sorted(deps)
           if _area(dst) in FORBIDDEN.get(_area(src), ())]
    assert not bad, "forbidden imports:\n" + "\n".join(bad)


def test_leaves_import_nothing_of_nanovllm(graph):
    bad = [f"{src} -> {dst}" for src, deps in sorted(graph.items()) if _area(src) in LEAVES for dst in sorted(deps)]
    assert not bad, "config, sampling_params, outputs and envs must import nothing of nanovllm:\n" + "\n".join(bad)


def test_imports_point_down(graph):
    bad = [f"{src} -> {dst}" for src, deps in sorted(graph.items()) for dst in sorted(deps)
           if _floor(_area(dst)) < _floor(_area(src))]
    assert not bad, ("imports must point down (serve/cli/entrypoints/bench -> engine -> worker -> loading -> "
                     "models -> layers -> kernels):\n" + "\n".join(bad))


def test_engine_files_import_no_torch():
    bad = [f"{p.relative_to(PACKAGE_DIR.parent)}: {sorted(_third_party_imports(p) & ENGINE_BANNED_THIRD_PARTY)}"
           for p in sorted((PACKAGE_DIR / "engine").glob("*.py")) if _third_party_imports(p) & ENGINE_BANNED_THIRD_PARTY]
    assert not bad, "the engine schedules; the worker holds the tensors:\n" + "\n".join(bad)


def test_environment_is_read_only_in_envs():
    """`os.environ` / `os.getenv` appear in nanovllm/envs.py only (switches are EngineConfig fields)."""
    bad = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        if path == PACKAGE_DIR / "envs.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "putenv"):
                bad.append(f"{os.path.relpath(path, PACKAGE_DIR.parent)}:{node.lineno}")
    assert not bad, "environment read outside nanovllm/envs.py:\n" + "\n".join(bad)


def test_importing_the_engine_loads_no_torch():
    """The engine process's scheduling code runs without torch; the worker brings it in when it starts."""
    import subprocess
    import sys

    code = "import sys, nanovllm.engine.llm_engine, nanovllm.engine.async_engine; print('torch' in sys.modules)"
    env = dict(os.environ, PYTHONPATH=str(PACKAGE_DIR.parent))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
