"""Devices: which are available, the one a run uses, and its seeded sampling generator.

Never hard-codes CUDA: 'auto' picks CUDA, then Apple MPS, then the CPU.
"""

from __future__ import annotations

import torch

from .errors import BoltzformerError


def available_devices() -> dict[str, bool]:
    """{"cpu": True, "cuda": ..., "mps": ...}: whether torch can use each kind of device here."""
    mps = getattr(torch.backends, "mps", None)
    return {
        "cpu": True,
        "cuda": torch.cuda.is_available(),
        "mps": bool(mps is not None and mps.is_available()),
    }


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' picks CUDA, then Apple MPS, then CPU; an unavailable device is a clear error."""
    name = str(device)
    avail = available_devices()
    if name == "auto":
        return torch.device("cuda" if avail["cuda"] else "mps" if avail["mps"] else "cpu")
    kind = name.split(":")[0]
    if kind not in avail:
        raise BoltzformerError(f"unknown device {name!r}; use auto, cpu, cuda or mps")
    if not avail[kind]:
        raise BoltzformerError(f"device {name!r} is not available on this machine; choose cpu or auto")
    return torch.device(name)


def fast_layout(module: torch.nn.Module, device: str | torch.device) -> torch.nn.Module:
    """On the CPU, store the module's convolution weights channels-last (5D ones channels-last 3D),
    oneDNN's own layout, and return it; on other devices leave it as it is (on an H200 under bf16
    it changed nothing measurable: benchmarks/results/cuda_graphs_h200.md).

    Measured on 2 CPU cores: the slice network's batch of 8 at 256² 322 -> 207-222 ms (encoder
    207 -> 129 ms, PiGMA 40-44 -> 11 ms), the 3D classifier on 120 candidates 0.59-0.62 ->
    0.33-0.40 s, a slice-network training step (batch 16) 2.2-2.3 -> 1.2-1.6 s, a 3D classifier
    training step (batch 32) 263-266 -> 194-218 ms; outputs within float rounding (4e-5).
    """
    if torch.device(device).type != "cpu":
        return module
    has_3d = any(p.dim() == 5 for p in module.parameters())
    return module.to(memory_format=torch.channels_last_3d if has_3d else torch.channels_last)


def sampling_generator(device: torch.device, seed: int) -> torch.Generator:
    """The seeded generator for Boltzmann sampling on `device`.

    CUDA draws its own noise; MPS and CPU draw on the CPU (MPS generators are not available on
    every torch build) and the noise is moved to the device, so a seed gives the same tokens on
    CPU and MPS.
    """
    dev = device if device.type == "cuda" else torch.device("cpu")
    return torch.Generator(device=dev).manual_seed(int(seed))
