"""Test-session setup. Triton kernels run on CPU tensors only under its interpreter, which must be switched on
before triton is first imported (diffusers and transformers import it), so it is set here, before any test module
loads. On a CUDA machine the kernels compile for the GPU instead."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
