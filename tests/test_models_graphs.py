"""models/graphs.GraphedStep's plumbing with torch.cuda's stream and graph API stood in for (no GPU here): the
first call eager, the second captured on static copies of the inputs, later calls copying their inputs in and
replaying, each output a copy, a refused capture leaving the step eager for good. The real capture runs in
benchmarks/gpu_models_check.py (gpt_generate_cuda_graph) on a GPU."""
import contextlib
import logging

import pytest
import torch

from fastattn.models import graphs


class _Graph:
    """A CUDA graph stand-in: the step records its work (on the static inputs) while ``capturing``; replay redoes
    it into the tensor the capture returned."""
    capturing = None

    def __init__(self):
        self.work = None

    def replay(self):
        self.work()


@pytest.fixture
def fake_cuda(monkeypatch):
    @contextlib.contextmanager
    def graph(g):
        _Graph.capturing = g
        try:
            yield
        finally:
            _Graph.capturing = None

    class Stream:
        def __init__(self, *a, **k):
            pass

        def wait_stream(self, other):
            pass

    monkeypatch.setattr(torch.cuda, "CUDAGraph", _Graph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: Stream())


def _step(log, refuse=False):
    """logits = 10 * token + position, as a graph would replay it: recorded on the capture's own tensors."""
    def step(tokens, input_pos):
        g = _Graph.capturing
        if g is not None and refuse:
            raise RuntimeError("operation not permitted when stream is capturing")
        out = (tokens * 10 + input_pos).float()
        if g is not None:
            g.work = lambda: out.copy_((tokens * 10 + input_pos).float())
            log.append("captured")
        else:
            log.append("eager")
        return out
    return step


def test_first_call_eager_then_capture_then_replays(fake_cuda):
    log = []
    graphed = graphs.GraphedStep(_step(log))
    outs = [graphed(torch.tensor([[t], [t + 1]]), torch.tensor([p])) for t, p in ((1, 5), (2, 6), (3, 7), (4, 8))]
    assert log == ["eager", "captured"]  # calls 3 and 4: replays, no step run
    for (t, p), out in zip(((1, 5), (2, 6), (3, 7), (4, 8)), outs):
        assert out.flatten().tolist() == [10 * t + p, 10 * (t + 1) + p]  # each from its own inputs, kept as given


def test_a_refused_capture_runs_eagerly_for_good(fake_cuda, caplog):
    log = []
    graphed = graphs.GraphedStep(_step(log, refuse=True))
    with caplog.at_level(logging.WARNING, logger="fastattn"):
        outs = [graphed(torch.tensor([[t]]), torch.tensor([0])) for t in (1, 2, 3)]
    assert [o.item() for o in outs] == [10, 20, 30] and log == ["eager", "eager", "eager"]
    assert graphed.failed and "could not be captured (RuntimeError: operation not permitted" in caplog.text
