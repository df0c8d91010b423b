"""The grouped launches' device tables under CUDA-graph capture and across streams
(kernels/_launch.py ``device_table``; rules in docs/design.md, "capturable=True").

No GPU here: the capture state and the streams are stood in for through the module's own
hooks (``_capturing_graph``, ``_current_stream``, ``_make_table``), so what is tested is the
cache's logic: which table a call gets, what is kept, and for how long."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

from lowrank_kernels.kernels import _launch as L

CPU = torch.device("cpu")


class _Graph:
    """Stands in for a ``torch.cuda.CUDAGraph`` being captured."""


@pytest.fixture
def capture(monkeypatch):
    """``capture.graph``: the graph "being captured" (None: eager)."""
    state = type("State", (), {"graph": None})()
    monkeypatch.setattr(L, "_capturing_graph", lambda device: state.graph)
    monkeypatch.setattr(L, "_DEVICE_TABLES", {})
    return state


def test_a_table_made_in_capture_stays_with_that_capture(capture):
    eager = L.device_table([1, 2, 3], torch.int64, CPU)
    g1 = _Graph()
    capture.graph = g1
    in_g1 = L.device_table([1, 2, 3], torch.int64, CPU)
    assert in_g1 is not eager and in_g1.tolist() == [1, 2, 3]  # the capture makes its own
    assert L.device_table([1, 2, 3], torch.int64, CPU) is in_g1  # reused within the capture
    other = L.device_table([4, 5], torch.int64, CPU)
    g2 = _Graph()
    capture.graph = g2
    in_g2 = L.device_table([1, 2, 3], torch.int64, CPU)
    assert in_g2 is not in_g1 and in_g2 is not eager  # never handed to another capture
    capture.graph = None
    assert L.device_table([1, 2, 3], torch.int64, CPU) is eager  # nor to an eager call
    assert L.device_table([4, 5], torch.int64, CPU) is not other
    assert all(t.dev is not in_g1 and t.dev is not in_g2 for t in L._DEVICE_TABLES.values())
    assert len(getattr(g1, L._CAPTURE_ATTR).tables) == 2 and len(getattr(g2, L._CAPTURE_ATTR).tables) == 1


def test_captured_tables_are_released_with_the_graph(capture):
    before = L.captured_table_count()
    graphs, refs = [], []
    for i in range(5):
        capture.graph = _Graph()
        graphs.append(capture.graph)
        refs.append(weakref.ref(L.device_table([i, 7, 7], torch.int64, CPU)))
    capture.graph = None
    assert L.captured_table_count() == before + 5
    assert all(r() is not None for r in refs)  # kept while their graph lives
    del graphs[:3]
    gc.collect()
    assert L.captured_table_count() == before + 2  # no unbounded growth
    assert [r() is None for r in refs] == [True] * 3 + [False] * 2


class _Stream:
    def __init__(self, name):
        self.name, self.waited = name, []

    def wait_event(self, event):
        self.waited.append(event)


class _Dev:
    """A device table stand-in that records ``record_stream`` calls."""

    def __init__(self):
        self.recorded = []

    def record_stream(self, stream):
        self.recorded.append(stream)


def test_a_hit_on_another_stream_waits_for_the_copy(capture, monkeypatch):
    s1, s2 = _Stream("s1"), _Stream("s2")
    current = [s1]
    made = []

    def make(values, dtype, device):
        t = L._Table(_Dev(), None, current[0], f"copy event {len(made)}")
        made.append(t)
        return t

    monkeypatch.setattr(L, "_current_stream", lambda device: current[0])
    monkeypatch.setattr(L, "_make_table", make)
    a = L.device_table([1, 2], torch.int64, CPU)
    assert L.device_table([1, 2], torch.int64, CPU) is a and s1.waited == [] and a.recorded == []
    current[0] = s2
    assert L.device_table([1, 2], torch.int64, CPU) is a
    assert s2.waited == ["copy event 0"] and a.recorded == [s2]  # ordered after the copy, kept for s2
    # in a capture on s2: its own copy, never the eager one
    capture.graph = _Graph()
    b = L.device_table([1, 2], torch.int64, CPU)
    assert b is not a and len(made) == 2
    current[0] = s1  # another stream of the same capture: its own copy too
    assert L.device_table([1, 2], torch.int64, CPU) is not b


def test_aligned_row_refuses_what_is_not_aligned():
    row = [0x1000, 0x1040, 64, 3]
    assert L.aligned_row(row, {0: 0x1000, 1: 0x1000}, [2]) == [0, 4, 4, 3]
    with pytest.raises(ValueError, match="field 1 address"):
        L.aligned_row(row, {1: 0x1008}, [])
    with pytest.raises(ValueError, match="field 3 value 3"):
        L.aligned_row(row, {}, [3])
