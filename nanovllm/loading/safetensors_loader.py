"""Iterate (name, tensor) over a HF directory's (sharded) safetensors files."""

from __future__ import annotations

import glob
import os
from typing import Iterator

import torch


def safetensors_files(model_dir: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise ValueError(f"no *.safetensors weights found in {model_dir}; convert .bin checkpoints to safetensors")
    return files


def iter_safetensors(model_dir: str) -> Iterator[tuple[str, torch.Tensor, str]]:
    """Yields (tensor name, tensor, file it came from)."""
    from safetensors import safe_open

    for path in safetensors_files(model_dir):
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name), path
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise ValueError(f"{path}: cannot read safetensors file ({e})") from e
