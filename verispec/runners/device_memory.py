"""How much memory a model's caches can take where they live, and the error when they cannot.

Available memory is the GPU's free memory (torch.cuda.mem_get_info) for a device on CUDA, else
MemAvailable (psutil if installed, else /proc/meminfo), or the VERISPEC_MEMORY_AVAILABLE
environment variable (bytes, or with a K/M/G suffix) to test or cap it. The runners' pools check
their own caches against it before allocating; the server's start-up check (serve/memory.py) adds
up everything a server allocates.
"""

from __future__ import annotations

import os

from ..errors import InvalidParameter

MiB = 1 << 20
GiB = 1 << 30


class InsufficientMemory(InvalidParameter):
    pass


def available_bytes(device=None) -> int:
    """Free memory where the model's caches go: the GPU's free bytes (torch.cuda.mem_get_info) for a CUDA device,
    else host RAM's MemAvailable. VERISPEC_MEMORY_AVAILABLE overrides both."""
    forced = os.environ.get("VERISPEC_MEMORY_AVAILABLE")
    if forced:
        return parse_size(forced)
    if device is not None and str(device).startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    raise RuntimeError("cannot tell how much memory is available")


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1 << 10, "M": MiB, "G": GiB}.get(text[-1:], 1)
    return int(float(text.rstrip("KMG")) * scale)
