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


@pytest.mark.parametrize("n_cores", [1, 4])
def test_start_tasks_starts_the_costliest_first_and_answers_in_task_order(monkeypatch, n_cores):
    """One worker thread (or the caller's, on one core) shows the start order exactly."""
    monkeypatch.setattr(parallel, "cores", lambda: n_cores)
    started = []

    def task(i):
        def run():
            started.append(i)
            return i * 10
        return run

    costs = [1.0, 50.0, 3.0, 50.0, 0.5]
    with parallel.task_pool(len(costs), max_threads=1) as pool:
        assert pool is None  # one thread: the tasks run in the caller's
        futures = parallel.start_tasks(pool, [task(i) for i in range(5)], costs)
    assert [f.result() for f in futures] == [0, 10, 20, 30, 40]
    assert started == [1, 3, 2, 0, 4]  # costliest first, ties in task order
    started.clear()
    with parallel.task_pool(len(costs), max_threads=2) as pool:
        assert (pool is None) == (n_cores == 1)
        futures = parallel.start_tasks(pool, [task(i) for i in range(5)], costs)
        assert [f.result() for f in futures] == [0, 10, 20, 30, 40]
    assert sorted(started) == [0, 1, 2, 3, 4]
