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
        raise BoltzformerError(f"device {name!r} is not available on this machine; use --device cpu or auto")
    return torch.device(name)


def sampling_generator(device: torch.device, seed: int) -> torch.Generator:
    """The seeded generator for Boltzmann sampling on `device`.

    CUDA draws its own noise; MPS and CPU draw on the CPU (MPS generators are not available on
    every torch build) and the noise is moved to the device, so a seed gives the same tokens on
    CPU and MPS.
    """
    dev = device if device.type == "cuda" else torch.device("cpu")
    return torch.Generator(device=dev).manual_seed(int(seed))
