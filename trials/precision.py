"""Numeric precision of training: fp32, or bf16 autocast for the network where the hardware makes it fast.

`train.precision` is "fp32", "bf16" or "auto". In bf16 only the network's forward pass of a training step
runs under `torch.autocast(dtype=bfloat16)` (convolutions and matmuls in bf16, the rest as autocast's
per-op policy says); its output is cast back to float32 before the DSM loss, so the loss, the sigma
weighting, the gradients of the float32 master weights, Adam's state, the EMA and all SDE math stay float32.
bf16 has float32's exponent range, so unlike fp16 it needs no loss scaling. Evaluation (validation DSM,
bits/dim, sampling) always runs in float32: it is the yardstick trials are ranked by.

"auto" picks bf16 only where the device has bf16 units (`auto_precision`): elsewhere bf16 is emulated and
slower than fp32, and the point of the setting is speed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn


def auto_precision(device_type: str, cuda_bf16: bool, cpu_capabilities: Mapping[str, Any]) -> str:
    """What "auto" means on a device: "bf16" where bf16 runs on dedicated units, else "fp32".

    CUDA: what torch.cuda.is_bf16_supported() says (Ampere and later have bf16 tensor cores). CPU: x86's
    AVX512-BF16 or AMX-BF16 instructions, which oneDNN uses for bf16 convolutions and matmuls, as listed by
    torch.cpu.get_capabilities(); without them bf16 is converted in software and is slower than fp32.
    Other CPUs (ARM included: not measured here) stay fp32.
    """
    if device_type == "cuda":
        return "bf16" if cuda_bf16 else "fp32"
    if device_type == "cpu":
        fast = cpu_capabilities.get("avx512_bf16", False) or cpu_capabilities.get("amx_bf16", False)
        return "bf16" if fast else "fp32"
    return "fp32"


def resolve_precision(setting: str, device: torch.device) -> str:
    """The precision a trainer on `device` uses for `setting` ("fp32", "bf16" or "auto")."""
    if setting != "auto":
        return setting
    if device.type == "cuda":
        return auto_precision("cuda", torch.cuda.is_bf16_supported(), {})
    # torch.cpu.get_capabilities() is torch >= 2.8; older versions report nothing and "auto" means fp32.
    capabilities = getattr(torch.cpu, "get_capabilities", dict)()
    return auto_precision(device.type, False, capabilities)


def autocast_forward(model: nn.Module, device_type: str, precision: str) -> Callable[..., torch.Tensor]:
    """`model` itself for fp32; for bf16, model(x, t) under bf16 autocast with its output back in float32."""
    if precision == "fp32":
        return model

    def forward(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type, dtype=torch.bfloat16):
            out = model(x, t)
        return out.float()

    return forward


def use_cuda_fast_math() -> None:
    """The CUDA settings that trade bit-exactness for speed without changing results beyond noise.

    TF32 for float32 matmuls (cuDNN convolutions already use TF32 by PyTorch's default) and cuDNN's
    autotuner, which times the convolution algorithms once per input shape (shapes are fixed here) and
    keeps the fastest. Process-wide: they also apply to evaluation in the same process, where convolutions
    were TF32 before this anyway; under bf16 autocast the training matmuls are bf16 and TF32 does not
    enter. The autotuner's choice can differ between processes, so a resumed CUDA run matches an
    uninterrupted one to rounding, not bit for bit (CPU runs stay bit-exact).
    """
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
