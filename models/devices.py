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


def is_cuda(device: str) -> bool:
    """Whether ``device`` ("cuda", "cuda:1", ...) names a CUDA device: the GPU-only paths (decoding on the device,
    channels-last inputs, batches sized from free memory) are taken only then."""
    return str(device).split(":")[0] == "cuda"


def out_of_memory_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a forward pass raises when the device runs out of memory (``torch.OutOfMemoryError``;
    ``torch.cuda.OutOfMemoryError`` is the same class where both exist)."""
    import torch

    found = {getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)}
    return tuple(error for error in found if error is not None)


def release_cached_memory(device: str) -> None:
    """Hand the CUDA caching allocator's unused blocks back to the device (after running out of memory)."""
    if is_cuda(device):
        import torch

        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()


def activation_budget(free: int, total: int, reserved_unused: int, allocated: int, share: float,
                      fraction: float) -> float:
    """Bytes a forward pass may use on top of what this process already holds (the weights): ``fraction`` of the
    smaller of what the device has free (plus what this process has cached but is not using) and this actor's
    share of the whole device (``num_gpus`` of 0.5: half of it, less what the process already holds), so that
    actors sharing a GPU leave each other room."""
    share = min(max(share, 0.0), 1.0) or 1.0
    own = total * share - allocated
    return max(0.0, fraction * min(free + reserved_unused, own))


def batch_size_for_memory(budget: float, bytes_per_image: float, cap: int) -> int:
    """The largest forward batch whose memory (``bytes_per_image`` each) fits ``budget``: at least 1, at most
    ``cap``."""
    if bytes_per_image <= 0:
        return cap
    return max(1, min(cap, int(budget // bytes_per_image)))


class CudaMemory:
    """The CUDA memory figures ``ForwardBatchSizer`` reads (one device); a test passes a stand-in instead."""

    def __init__(self, device: str):
        import torch

        self.torch, self.device = torch, torch.device(device)

    def free_and_total(self) -> tuple[int, int]:
        return self.torch.cuda.mem_get_info(self.device)

    def allocated(self) -> int:
        return self.torch.cuda.memory_allocated(self.device)

    def reserved(self) -> int:
        return self.torch.cuda.memory_reserved(self.device)

    def reset_peak(self) -> None:
        self.torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        return self.torch.cuda.max_memory_allocated(self.device)


class ForwardBatchSizer:
    """How many images each forward pass takes.

    ``setting`` is the stage's ``resources.forward_batch``: a number of images, 0 for ``cap`` (the rows Ray hands
    the actor at a time, ``resources.batch_size``), or "auto": on CUDA, the first pass takes ``probe`` images while
    the peak memory it allocates on top of the weights is measured, and later passes take as many images as fit
    ``fraction`` of the memory this actor may use (see ``activation_budget``), never more than ``cap``; the
    per-image cost kept is the largest seen. Off CUDA, "auto" is ``cap``. The size does not change what is
    computed (each image's outputs come from that image alone), at most its floating-point rounding on a GPU.

    After a forward pass runs out of device memory, ``shrink`` halves that pass's size and keeps the result as a
    ceiling for every later pass."""

    PROBE = 8

    def __init__(self, setting: int | str, cap: int, device: str, share: float = 1.0, fraction: float = 0.8,
                 memory=None):
        if setting != "auto" and (not isinstance(setting, int) or setting < 0):
            raise ValueError(f"forward_batch must be a number of images >= 0 or 'auto', got {setting!r}")
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"memory_fraction must be in (0, 1], got {fraction}")
        self.cap, self.share, self.fraction = max(1, cap), share, fraction
        self.adaptive = setting == "auto" and is_cuda(device)
        self.fixed = self.cap if setting in (0, "auto") else setting
        self.memory = (memory or CudaMemory(device)) if self.adaptive else None
        self.bytes_per_image, self.measured = 0.0, False
        self.ceiling: int | None = None  # set after running out of memory: no pass takes more from then on

    def next_size(self, remaining: int) -> int:
        size = self._size(remaining)
        return size if self.ceiling is None else min(size, self.ceiling)

    def _size(self, remaining: int) -> int:
        if not self.adaptive:
            return min(self.fixed, remaining)
        if not self.measured:
            return min(self.PROBE, self.cap, remaining)
        free, total = self.memory.free_and_total()
        allocated = self.memory.allocated()
        budget = activation_budget(free, total, self.memory.reserved() - allocated, allocated, self.share,
                                   self.fraction)
        return min(batch_size_for_memory(budget, self.bytes_per_image, self.cap), remaining)

    def shrink(self, failed: int) -> int:
        """A pass of ``failed`` images ran out of memory: half of it is the most any later pass takes. Returns
        the new ceiling; a pass of one image cannot shrink (ValueError)."""
        if failed <= 1:
            raise ValueError("a forward pass of one image cannot be made smaller")
        self.ceiling = failed // 2 if self.ceiling is None else min(self.ceiling, failed // 2)
        return self.ceiling

    @contextlib.contextmanager
    def measure(self, size: int):
        """Around one forward pass of ``size`` images: records its peak memory per image (adaptive sizing only)."""
        if not self.adaptive:
            yield
            return
        base = self.memory.allocated()
        self.memory.reset_peak()
        yield
        used = max(0, self.memory.peak() - base)
        self.bytes_per_image = max(self.bytes_per_image, used / max(1, size))
        self.measured = True
