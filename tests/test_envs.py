"""Every environment variable nanovllm reads is declared once in nanovllm/envs.py, and the
switches that mirror EngineConfig fields parse to valid values of those fields."""

import re
from pathlib import Path

import pytest

from nanovllm import envs
from nanovllm.config import EngineConfig

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "nanovllm"


def test_every_variable_named_in_the_package_is_declared():
    declared = {v.name for v in envs.ALL}
    named = set()
    for path in PACKAGE_DIR.rglob("*.py"):
        named |= set(re.findall(r"\bNANOVLLM_[A-Z0-9_]+\b", path.read_text()))
    assert named <= declared, f"declare these in nanovllm/envs.py: {sorted(named - declared)}"
    assert len(declared) == len(envs.ALL)
    for var in envs.ALL:
        assert var.meaning and (var.config_field is None or var.config_field in EngineConfig.__dataclass_fields__)


@pytest.mark.parametrize("name,value,field,expected", [
    ("NANOVLLM_GEMV", "0", "gemv", "off"),
    ("NANOVLLM_GEMV", "force", "gemv", "force"),
    ("NANOVLLM_GEMV", "1", "gemv", "auto"),
    ("NANOVLLM_GEMV_FUSE", "0", "fuse_gemv_prologues", False),
    ("NANOVLLM_PDL", "0", "pdl", False),
    ("NANOVLLM_PDL", "1", "pdl", True),
    ("NANOVLLM_CASCADE", "0", "cascade_attention", "off"),
    ("NANOVLLM_CASCADE", "force", "cascade_attention", "force"),
    ("NANOVLLM_DISABLE_TRITON", "1", "use_triton", False),
    ("NANOVLLM_STEP_TIMING", "1", "step_timing", True),
])
def test_overrides_parse_to_valid_config_values(monkeypatch, name, value, field, expected):
    for var in envs.ALL:
        monkeypatch.delenv(var.name, raising=False)
    assert envs.config_overrides() == {}
    monkeypatch.setenv(name, value)
    overrides = envs.config_overrides()
    assert overrides == {field: expected}
    assert getattr(EngineConfig(**overrides), field) == expected  # validated like a user's value


def test_a_bad_override_is_refused_by_the_config(monkeypatch):
    monkeypatch.setenv("NANOVLLM_GEMV", "sometimes")
    with pytest.raises(ValueError, match="gemv"):
        EngineConfig(**envs.config_overrides())
