"""Where and in which precision a command runs (the device, the autocast dtype), the model behind its wrappers,
and scores from logits. Shared by train, evaluate, predict, export and benchmark, so each makes the same choice."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from tresfinetune.errors import UserError
from tresfinetune.tasks import MULTI_LABEL

# NVIDIA GPUs compute bf16 natively from compute capability 8.0 (Ampere) on. Older ones (V100, T4) report bf16 as
# "supported" because it is emulated, slower than fp16 and no more accurate for training; they get fp16.
NATIVE_BF16_CAPABILITY = (8, 0)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{name}' was asked for but PyTorch sees no CUDA GPU; use --set device=cpu")
    return torch.device(name)


def half_dtype_for_capability(capability: tuple[int, int]) -> torch.dtype:
    """The 16-bit autocast dtype for a CUDA GPU of this compute capability."""
    return torch.bfloat16 if tuple(capability) >= NATIVE_BF16_CAPABILITY else torch.float16


def half_dtype(device: torch.device) -> torch.dtype:
    """bf16 on the CPU and on GPUs that compute it natively, fp16 on older GPUs."""
    if device.type == "cuda":
        return half_dtype_for_capability(torch.cuda.get_device_capability(device))
    return torch.bfloat16


def amp_dtype_for(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a recipe's `amp` (auto | bf16 | fp16 | none); auto is off on the CPU (slower there)."""
    if amp == "none" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        return half_dtype(device)
    return torch.float16 if amp == "fp16" else torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel and torch.compile wrappers."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    return getattr(model, "_orig_mod", model)  # torch.compile


def scores_from_logits(logits: torch.Tensor, task: str) -> torch.Tensor:
    """Class probabilities: softmax over classes for single-label, a sigmoid per class for multi-label."""
    logits = logits.float()
    return logits.sigmoid() if task == MULTI_LABEL else logits.softmax(1)
