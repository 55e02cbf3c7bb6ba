"""Numeric precision of the learned methods: one resolver for training and fusion.

`train.precision` (or `--precision`) is `float32`, `bfloat16`, or `auto`: bfloat16 where the
device computes it fast, float32 elsewhere. bfloat16 runs the network under
`torch.autocast`: parameters, optimiser state and checkpoints stay float32, convolutions and
matrix products run in bfloat16, and the losses and the fused image are computed in float32.

"Fast" is measured, not assumed: on a CPU only AMX (`amx_bf16`) qualifies. With AVX512-BF16
alone (no AMX) oneDNN's bfloat16 convolutions were slower than its float32 ones here: a
W-DUALMINE training step took 14-25 % more CPU time and inference 26-46 % longer
(docs/wdualmine.md, *Precision*). `bfloat16` set explicitly is honoured on any device.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch

from medfuse.errors import ConfigError

PRECISIONS = ("auto", "float32", "bfloat16")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def cpu_has_fast_bf16() -> bool:
    """AMX with bfloat16 tiles (Intel Sapphire Rapids and later), as torch detects it."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is None:  # older torch: the private probe that `get_capabilities` wraps
        return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    return bool(capabilities().get("amx_bf16", False))


def device_has_fast_bf16(device: str) -> bool:
    if device == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device == "cpu" and cpu_has_fast_bf16()


def resolve_precision(requested: str | None, device: str) -> str:
    """`auto` | `float32` | `bfloat16` (None = auto) -> `float32` or `bfloat16` on `device`."""
    value = "auto" if requested is None else str(requested)
    if value not in PRECISIONS:
        raise ConfigError(f"train.precision: unknown value {value!r}; use {', '.join(PRECISIONS)}")
    if value == "auto":
        return "bfloat16" if device_has_fast_bf16(device) else "float32"
    return value


def autocast(precision: str, device: str) -> AbstractContextManager:
    """The context a forward pass (and its loss) runs in: autocast for bfloat16, else none."""
    return torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=precision == "bfloat16")


def to_autocast_dtype(x: torch.Tensor) -> torch.Tensor:
    """`x` in the active autocast dtype of its device (unchanged outside autocast).

    Casting a network's input once keeps every element-wise op between the convolutions in
    bfloat16; otherwise ops that autocast leaves alone promote back to float32, and each
    following convolution casts its whole input again.
    """
    device = x.device.type
    if not x.is_floating_point() or not torch.is_autocast_enabled(device):
        return x
    return x.to(torch.get_autocast_dtype(device))
