"""Device and precision choices shared by the model stages and the trainers.

torch is imported on first use: CPU-only stages import this module through the stage registry and must not pay
torch's start-up (seconds per worker) for nothing.
"""

from __future__ import annotations

import contextlib

PRECISION_NAMES = ("bf16", "fp16", "fp32")


def torch_dtype(precision: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def resolve_device(requested: str = "auto") -> str:
    """"auto" picks CUDA when this process can see a GPU, else the CPU."""
    if requested == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def autocast_context(device: str, precision: str):
    """Mixed precision on GPU; float32 (no autocast) on CPU or when asked for fp32."""
    if device == "cpu" or precision == "fp32":
        return contextlib.nullcontext()
    import torch

    return torch.autocast(device_type=device.split(":")[0], dtype=torch_dtype(precision))
