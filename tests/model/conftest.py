"""Shared fixtures of the core's tests."""

import signal

import pytest


@pytest.fixture(autouse=True)
def ctrl_c_raises():
    """Ctrl-C raises KeyboardInterrupt, as in a terminal, even when pytest was started in the
    background by a shell without job control (which starts it with SIGINT ignored): the tests
    that send SIGINT check what an interrupted write leaves behind."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.fixture(scope="module")
def tiny_segmenter(tmp_path_factory):
    """A Segmenter on an untrained 'boltzformer-test' network (seed 0): fast, deterministic."""
    from boltzformer.checkpoint import save_model
    from boltzformer.network.boltzformer import build_model
    from boltzformer.network.config import get_config
    from boltzformer.segmenter import Segmenter

    path = tmp_path_factory.mktemp("w") / "w.safetensors"
    save_model(build_model(get_config("boltzformer-test"), seed=0), path, prompt_bank={})
    return Segmenter.from_pretrained(path, device="cpu")
