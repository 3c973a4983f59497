"""The adapter registry both runtimes share: LRU eviction, the active one, pins and draining."""

from __future__ import annotations

import pytest

from agent.residency import Residency
from agent.runtime_base import AdapterBusy, AdapterLoadError, AdapterNotLoaded


def test_eviction_spares_the_new_the_active_and_the_pinned() -> None:
    reg = Residency(max_bytes=250)
    assert reg.add("a", "h-a", 100) == [] and reg.add("b", "h-b", 100) == []
    reg.pin("a")  # a is now the most recently used, and pinned
    assert reg.add("c", "h-c", 100) == ["h-b"]  # b: least recently used, unpinned, inactive
    reg.activate("c")
    assert reg.add("d", "h-d", 100) == []  # a pinned, c active, d new: over budget, nothing to drop
    assert list(reg.sizes()) == ["a", "c", "d"]
    with pytest.raises(AdapterLoadError, match="already loaded"):
        reg.add("d", "h-d2", 1)


def test_unload_refuses_the_active_and_drains_the_pinned() -> None:
    reg = Residency(max_bytes=10**6)
    reg.add("a", "h-a", 10)
    reg.add("b", "h-b", 10)
    assert reg.activate("a") == "h-a" and reg.active_handle() == "h-a"
    with pytest.raises(AdapterBusy):
        reg.remove("a")
    name, pinned = reg.pin("b")
    assert name == "b" and pinned is not None and pinned.pins == 1
    assert reg.remove("b") is None  # still pinned: released by the last unpin
    assert "b" not in reg.sizes() and reg.unpin(pinned) == "h-b"
    with pytest.raises(AdapterNotLoaded):
        reg.remove("b")
    with pytest.raises(AdapterNotLoaded):
        reg.pin("b")
    assert reg.pin(...) == ("a", reg.get("a")) and reg.pin(None) == (None, None)
    reg.activate(None)
    assert reg.active is None and reg.active_handle() is None and reg.remove("a") is None  # pinned above
