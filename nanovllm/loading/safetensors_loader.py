"""Iterate (name, tensor) over a HF directory's (sharded) safetensors files.

Tensors come as `SafetensorsTensor`s: the shape is known at once, the bytes are read only
for the part a rank asks for (`narrow`, through safetensors' `get_slice`), so under tensor
parallelism each rank reads only its shard of every weight. Each one is valid until the
iteration moves on (its file is then closed).
"""

from __future__ import annotations

import glob
import os
from typing import Iterator

import torch


class SafetensorsTensor:
    """One tensor of an open safetensors file, read lazily (whole or one slice along a dim)."""

    __slots__ = ("_slice", "shape")

    def __init__(self, file_slice) -> None:
        self._slice = file_slice
        self.shape = torch.Size(file_slice.get_shape())

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        index = (slice(None),) * dim + (slice(start, start + length),)
        return self._slice[index]

    def load(self) -> torch.Tensor:
        return self._slice[:] if len(self.shape) else self._slice[()]


def safetensors_files(model_dir: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise ValueError(f"no *.safetensors weights found in {model_dir}; convert .bin checkpoints to safetensors")
    return files


def iter_safetensors(model_dir: str) -> Iterator[tuple[str, SafetensorsTensor, str]]:
    """Yields (tensor name, lazy tensor, file it came from)."""
    from safetensors import safe_open

    for path in safetensors_files(model_dir):
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, SafetensorsTensor(f.get_slice(name)), path
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise ValueError(f"{path}: cannot read safetensors file ({e})") from e
