"""Where a step runs: `--device auto|cpu|cuda` (and the `device` key of the `sft` and `dpo` config sections).

`auto` is CUDA when PyTorch sees a GPU, else the CPU. On CUDA, training autocasts to bf16 (where the GPU has it) and
decoding runs the weights in bf16. On the CPU decoding stays float32 (what the parity checks compare against), and
training autocasts to bf16 only where the CPU multiplies bf16 in hardware (AMX or AVX512-BF16: the MovieLens-1M
model trains 1.4-3.4x faster than in float32 there; elsewhere bf16 is emulated and slower). The `precision` key of
the `sft` and `dpo` sections overrides that choice. Nothing else in LEADRE names a device.
"""

from __future__ import annotations

import torch

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "bf16", "fp32")


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


def native_cpu_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions (AMX tiles or AVX512-BF16), which oneDNN uses for bf16 matmuls."""
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in ("_is_amx_tile_supported",
                                                                         "_is_avx512_bf16_supported"))


def train_bf16(device: torch.device, precision: str = "auto") -> bool:
    """Whether training on `device` autocasts to bf16: `auto` where the device computes bf16 natively (a CUDA GPU
    that supports it, a CPU with AMX or AVX512-BF16), else as `precision` (bf16 | fp32) says."""
    if precision not in PRECISIONS:
        raise DeviceError(f"unknown precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return bf16_ok(device) or (device.type == "cpu" and native_cpu_bf16())
    if precision == "bf16" and device.type == "cuda" and not bf16_ok(device):
        raise DeviceError(f"precision 'bf16' requested, but {describe(device)} does not support bf16")
    return precision == "bf16"


def inference_dtype(device: torch.device) -> torch.dtype:
    """The weights' dtype for decoding on `device`: bf16 on a GPU that has it, float32 elsewhere."""
    return torch.bfloat16 if bf16_ok(device) else torch.float32


def describe(device: torch.device) -> str:
    """A short human description for logs and manifests, e.g. 'cuda:0 (NVIDIA H100 80GB HBM3)'."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return "cpu"
