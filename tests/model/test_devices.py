"""Device selection never hard-codes CUDA; MPS paths fall back to CPU noise generation."""

import pytest
import torch

from boltzformer import devices
from boltzformer.errors import BoltzformerError
from boltzformer.network import sampling


def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(devices, "available_devices", lambda: {"cpu": True, "cuda": False, "mps": True})
    assert devices.resolve_device("auto").type == "mps"
    monkeypatch.setattr(devices, "available_devices", lambda: {"cpu": True, "cuda": True, "mps": True})
    assert devices.resolve_device("auto").type == "cuda"
    monkeypatch.setattr(devices, "available_devices", lambda: {"cpu": True, "cuda": False, "mps": False})
    assert devices.resolve_device("auto").type == "cpu"


def test_unavailable_device_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(devices, "available_devices", lambda: {"cpu": True, "cuda": False, "mps": False})
    with pytest.raises(BoltzformerError, match="not available"):
        devices.resolve_device("mps")
    with pytest.raises(BoltzformerError, match="not available"):
        devices.resolve_device("cuda")


def test_mps_sampling_uses_a_cpu_generator_with_the_same_tokens_as_cpu():
    g_mps = devices.sampling_generator(torch.device("mps"), 7)
    g_cpu = devices.sampling_generator(torch.device("cpu"), 7)
    assert g_mps.device.type == "cpu"
    conf = torch.rand(1, 2, 300)
    a = sampling.sample_tokens(conf, 30, 0.5, g_mps)
    b = sampling.sample_tokens(conf, 30, 0.5, g_cpu)
    assert torch.equal(a, b)


def test_sampling_ops_run_in_float16_and_bfloat16_inputs():
    """Autocast on GPUs feeds half-precision confidences; sampling works in float32 internally."""
    for dtype in (torch.float16, torch.bfloat16):
        conf = torch.rand(2, 3, 100).to(dtype)
        idx = sampling.sample_tokens(conf, 10, 0.25, torch.Generator().manual_seed(0))
        assert idx.shape == (2, 3, 10) and idx.dtype == torch.int64
        assert sampling.boltzmann_probabilities(conf, 0.5).dtype == torch.float32
