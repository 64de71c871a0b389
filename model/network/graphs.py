"""CUDA graphs: replay a fixed-shape forward pass without launching its kernels one by one.

Why: on a GPU each decoder layer's sparse attention is about ten small kernels (the Boltzmann
draw, the top-k, the row gather, the attention itself). Launched one at a time from Python, each
costs the host about 20 µs, more than the GPU work at 16² and 32² token maps, where eagerly the
sparse path measured 0.71-1.06× the speed of dense attention; replayed as a CUDA graph it was
1.03-5.8× faster at every size (benchmarks/results/decoder_cuda_graphs.md, H100). A graph records
the kernels once, with their tensor addresses, and replays them with one launch.

What a graph needs: fixed shapes and addresses (inputs are copied into static tensors before each
replay), no host synchronisation inside, and the sampling noise drawn from a generator registered
with the graph: a replay reads that generator's seed and offset when it starts and advances it by
the whole graph's draws, exactly as the eager kernels would, so a seed gives the same tokens
replayed or not.

CPU and MPS never use graphs; every function here is then a no-op or returns None.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

import torch

log = logging.getLogger(__name__)


def graphs_available(device: torch.device) -> bool:
    """Whether forward passes on `device` can be captured: CUDA, with a torch whose graphs can
    register a custom generator (`CUDAGraph.register_generator_state`; the sampling draws from a
    seeded one)."""
    return device.type == "cuda" and hasattr(torch.cuda.CUDAGraph, "register_generator_state")


def capture(fn: Callable[[], object], generators=(), pool=None, stream: torch.cuda.Stream | None = None,
            warmup: int = 1):
    """Run fn() `warmup` times on a side stream (lazy CUDA set-up must not happen while recording),
    then record one call of it as a CUDA graph.

    fn: CUDA work only, on tensors that stay allocated (its inputs are static tensors the caller
    refills before each replay). generators: the torch.Generators fn draws from; their states are
    restored after the warm-up, so capturing consumes no random numbers.
    Returns (graph, output of the recorded call): graph.replay() reruns it, overwriting that output.
    """
    states = [g.get_state() for g in generators]
    stream = stream or torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    for g, s in zip(generators, states):
        g.set_state(s)
    graph = torch.cuda.CUDAGraph()
    for g in generators:
        graph.register_generator_state(g)
    # thread_local: other threads (a viewer, post-processing of an earlier volume) may use CUDA meanwhile
    with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
        out = fn()
    for g, s in zip(generators, states):
        g.set_state(s)
    return graph, out


class GraphedNetwork:
    """Per-shape CUDA graphs of the slice network's plain forward pass -> logits.

    `run` returns None (the caller then runs the network eagerly) for a shape seen for the first
    time, on CPU/MPS, or when capturing failed; from a shape's second batch on it replays a graph.
    So a volume's last, shorter batch never costs a capture, and a failure only costs speed.
    Graphs hold their own GPU memory (one pool shared by all shapes: they never run at once).
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, enabled: bool = True):
        self.model = model
        self.enabled = bool(enabled) and graphs_available(device)
        self._seen: set = set()
        self._graphs: dict = {}
        self._failed: set = set()
        self._pool = None
        self._stream = None
        self._weights = None  # a hash of the weights' storage addresses and versions at recording
        # one replay at a time: a graph's input, output and generator are shared by every caller
        # of its batch shape (two threads sharing a Segmenter would read each other's slices)
        self._lock = threading.Lock()

    def clear(self) -> None:
        """Forget every graph and its memory pool (after an out-of-memory error; changed weights
        clear them by themselves, changed inference options are part of each graph's key)."""
        self._seen.clear()
        self._graphs.clear()
        self._failed.clear()
        self._pool = None

    def run(self, image: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor, pooled: torch.Tensor,
            generator: torch.Generator | None) -> torch.Tensor | None:
        """image: B x C x S x S float32 on the GPU, tokens: B x T x E, valid: B x T, pooled: B x E
        -> logits B x 1 x S x S (bf16 autocast, a fresh tensor) or None (run it eagerly)."""
        if not self.enabled or generator is None or generator.device.type != "cuda":
            return None
        with self._lock:
            return self._run(image, tokens, valid, pooled, generator)

    def _run(self, image, tokens, valid, pooled, generator) -> torch.Tensor | None:
        # A graph replays fixed addresses, and what was computed from the weights when it was
        # recorded (the attention's folded projections): weights given new storage (module.to(),
        # another memory format) or changed in place (load_state_dict bumps their version) need
        # new graphs. The cfg holds the inference options (sampling, ratio, tau0, attention_impl).
        weights = hash(tuple((t.data_ptr(), None if t.is_inference() else t._version)
                             for ts in (self.model.parameters(), self.model.buffers()) for t in ts))
        if weights != self._weights:
            self.clear()  # the old graphs read storage that may be freed: drop them and their memory
            self._weights = weights
        key = (tuple(image.shape), tuple(tokens.shape), tuple(pooled.shape), image.dtype, generator.device,
               repr(self.model.cfg))
        if key in self._failed:
            return None
        if key not in self._graphs:
            if key not in self._seen:
                self._seen.add(key)
                return None
            try:
                self._graphs[key] = self._capture(image, tokens, valid, pooled, generator)
            except Exception as err:  # noqa: BLE001 - a graph is only a speed-up: fall back to eager
                self._failed.add(key)
                log.warning("CUDA graph capture failed (%s); this batch shape runs eagerly", err)
                return None
        graph, static, out, gen = self._graphs[key]
        gen.set_state(generator.get_state())  # the graph draws from the generator it recorded
        for dst, src in zip(static, (image, tokens, valid, pooled)):
            dst.copy_(src, non_blocking=True)
        graph.replay()
        generator.set_state(gen.get_state())  # ... and the caller's ends where an eager pass leaves it
        return out.clone()

    def _capture(self, image, tokens, valid, pooled, generator):
        static = [t.clone() for t in (image, tokens, valid, pooled)]
        # The graph keeps its own generator: it records this one's state object, and later volumes
        # bring generators of their own (their states are copied in and out around each replay).
        gen = torch.Generator(device=generator.device)
        gen.set_state(generator.get_state())

        def forward():
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                return self.model(*static, generator=gen)["logits"]

        self._stream = self._stream or torch.cuda.Stream()
        graph, out = capture(forward, generators=(gen,), pool=self._pool, stream=self._stream)
        self._pool = graph.pool()
        return graph, static, out, gen
