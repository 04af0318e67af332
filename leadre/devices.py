"""Where a step runs: `--device auto|cpu|cuda` (and the `device` key of the `sft` and `dpo` config sections).

`auto` is CUDA when PyTorch sees a GPU, else the CPU. On CUDA, training autocasts to bf16 (where the GPU has it) and
decoding runs the weights in bf16; on the CPU everything stays float32, which is both faster there and what the
parity checks compare against. Nothing else in LEADRE names a device.
"""

from __future__ import annotations

import torch

DEVICES = ("auto", "cpu", "cuda")


class DeviceError(ValueError):
    """A device that was asked for but is not there (a ValueError: the CLI turns it into a message, exit 2)."""


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """`auto` | `cpu` | `cuda` | `cuda:N` → the torch device; DeviceError where CUDA is asked for and absent."""
    if isinstance(name, torch.device):
        name = str(name)
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise DeviceError(f"device {name!r} requested, but PyTorch sees no CUDA device (torch {torch.__version__}, "
                              f"{build}); use --device cpu or --device auto")
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {name!r} requested, but only {torch.cuda.device_count()} CUDA device(s) exist")
        return device
    raise DeviceError(f"unknown device {name!r}: expected one of {', '.join(DEVICES)} (or cuda:N)")


def bf16_ok(device: torch.device) -> bool:
    """Whether work on `device` runs in bf16: CUDA GPUs that support it (Ampere and later)."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def inference_dtype(device: torch.device) -> torch.dtype:
    """The weights' dtype for decoding on `device`: bf16 on a GPU that has it, float32 elsewhere."""
    return torch.bfloat16 if bf16_ok(device) else torch.float32


def describe(device: torch.device) -> str:
    """A short human description for logs and manifests, e.g. 'cuda:0 (NVIDIA H100 80GB HBM3)'."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return "cpu"
