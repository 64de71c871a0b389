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


def test_fast_layout_is_channels_last_on_the_cpu_only_and_keeps_outputs():
    import torch
    from torch import nn

    from boltzformer.devices import fast_layout

    torch.manual_seed(0)
    net2d = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1))
    net3d = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1))
    x2, x3 = torch.randn(2, 3, 16, 16), torch.randn(2, 2, 6, 8, 8)
    y2, y3 = net2d(x2), net3d(x3)
    assert fast_layout(net2d, "cpu") is net2d
    fast_layout(net3d, torch.device("cpu"))
    w2, w3 = net2d[0].weight, net3d[0].weight
    assert w2.is_contiguous(memory_format=torch.channels_last) and not w2.is_contiguous()
    assert w3.is_contiguous(memory_format=torch.channels_last_3d) and not w3.is_contiguous()
    torch.testing.assert_close(net2d(x2), y2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(net3d(x3), y3, atol=1e-5, rtol=1e-5)
    other = nn.Conv2d(3, 8, 3)
    fast_layout(other, "meta")  # any device but the CPU: left as it is
    assert other.weight.is_contiguous()
