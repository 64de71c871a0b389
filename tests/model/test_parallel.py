import threading

import pytest

from boltzformer import parallel


def test_thread_map_keeps_input_order_and_uses_threads(monkeypatch):
    monkeypatch.setattr(parallel, "cores", lambda: 4)
    seen = set()

    def square(x):
        seen.add(threading.current_thread().name)
        return x * x

    assert parallel.thread_map(square, range(50)) == [x * x for x in range(50)]
    assert any(n.startswith("boltzformer-worker") for n in seen)


def test_thread_map_runs_inline_on_one_core_and_raises_like_a_loop(monkeypatch):
    monkeypatch.setattr(parallel, "cores", lambda: 1)
    assert parallel.thread_map(lambda x: threading.current_thread().name, [1, 2]) == [threading.current_thread().name] * 2
    monkeypatch.setattr(parallel, "cores", lambda: 4)

    def boom(x):
        if x == 3:
            raise ValueError("candidate 3")
        return x

    with pytest.raises(ValueError, match="candidate 3"):
        parallel.thread_map(boom, range(6))
    assert parallel.thread_map(boom, []) == []
