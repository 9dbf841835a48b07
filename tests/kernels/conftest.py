"""Kernel tests: run the Triton kernels under the interpreter when there is no GPU.

`TRITON_INTERPRET` is read by triton (at import / kernel decoration), so it is set here, at
conftest import, before any test module of this directory imports a kernel. It only
matters to triton: tests elsewhere in the same session that call kernels also run
interpreted (slower, still right). On a CUDA machine nothing is changed.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
