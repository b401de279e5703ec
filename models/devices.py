"""Device and precision choices shared by the model stages and the trainers."""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device(requested: str = "auto") -> str:
    """"auto" picks CUDA when this process can see a GPU, else the CPU."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def autocast_context(device: str, precision: str):
    """Mixed precision on GPU; float32 (no autocast) on CPU or when asked for fp32."""
    if device == "cpu" or precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=PRECISIONS[precision])
