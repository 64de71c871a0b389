"""Fixtures shared by the core's and the plugin's tests."""

import pytest


@pytest.fixture
def keyword_spy(monkeypatch):
    """spy(owner, name, keyword) -> a list that receives the value of ``keyword`` (None when not
    given) at every later call of ``owner.name`` (a class or an instance); the method still runs."""

    def spy(owner, name: str, keyword: str) -> list:
        seen = []
        original = getattr(owner, name)

        def record(*args, **kwargs):
            seen.append(kwargs.get(keyword))
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, record)
        return seen

    return spy
