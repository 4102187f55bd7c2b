"""generate's decode step replayed from a CUDA graph (``generate(..., cuda_graph=True)``).

On a GPU an eager decode step is host-bound: each layer launches a dozen small kernels and each launch costs tens of
microseconds of Python (GPU run 4: GPT-2-medium's bf16 step took 13 ms of host time for well under 1 ms of kernels).
The step has static shapes (the cache preallocated, the unwritten slots masked, positions on the device), so one
capture serves the whole generation, as gpt-fast's compiled step and transformers' static cache do: the first call
runs eagerly on a side stream (Triton compiles and autotunes there), the second is captured and every call from then
on copies its inputs into the graph's and replays it. A step that cannot be captured (a host sync: ALiBi's cache end,
say) is logged and runs eagerly for the rest of the generation. The sliding-window layers' caches are not bounded
here (``setup_caches``' bound_windows shifts them on the host): the graph reads the whole ones.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
from torch import Tensor

log = logging.getLogger("fastattn")
Step = Callable[[Tensor, Tensor], Tensor]


def check_cuda_graph(input_ids: Tensor, num_beams: int, speculative: bool) -> None:
    """generate's refusals of ``cuda_graph=True``, by name."""
    if input_ids.device.type != "cuda":
        raise ValueError(f"cuda_graph: needs a model and input_ids on a CUDA device, got {input_ids.device}")
    if num_beams > 1 or speculative:
        raise ValueError("cuda_graph: greedy search and sampling only, not beam search or speculative decoding")


class GraphedStep:
    """``step(tokens (B, 1), input_pos (1,)) -> logits (B, V)`` from a CUDA graph after one eager call."""

    def __init__(self, step: Step):
        self.step, self.calls = step, 0
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.failed = False

    def __call__(self, tokens: Tensor, input_pos: Tensor) -> Tensor:
        self.calls += 1
        if self.failed:
            return self.step(tokens, input_pos)
        if self.calls == 1:  # the warm-up, as torch's CUDA-graph notes ask: off the capturing stream
            side = torch.cuda.Stream(tokens.device)
            side.wait_stream(torch.cuda.current_stream(tokens.device))
            with torch.cuda.stream(side):
                out = self.step(tokens, input_pos)
            torch.cuda.current_stream(tokens.device).wait_stream(side)
            return out
        if self.graph is None and not self._capture(tokens, input_pos):
            return self.step(tokens, input_pos)
        self.tokens.copy_(tokens)
        self.input_pos.copy_(input_pos)
        self.graph.replay()
        return self.out.clone()  # the graph's output is overwritten by the next replay

    def _capture(self, tokens: Tensor, input_pos: Tensor) -> bool:
        """Record the step on static copies of the inputs (nothing runs: the first replay runs it)."""
        self.tokens, self.input_pos = tokens.clone(), input_pos.clone()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.out = self.step(self.tokens, self.input_pos)
        except Exception as e:  # noqa: BLE001 (whatever the step does that a capture refuses)
            self.failed = True
            log.warning("generate(cuda_graph=True): the decode step could not be captured (%s: %s); it runs eagerly",
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            return False
        self.graph = graph
        return True
