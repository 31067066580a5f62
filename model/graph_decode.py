"""Qwen2.5-VL decode steps replayed as CUDA graphs over the static KV cache (`generate(..., cuda_graph=True)`).

`decode_step` (model/qwen2_5_vl_generation.py) has static shapes: one token per row, keys written at a
`cache_position` tensor, attention over the whole preallocated cache under a mask. A `GraphDecoder` owns such a cache
for one (batch, max_len) plus static input buffers (token [B], position [1]) and output buffers (fp32 logits [B, V],
hidden [B, d]). Its first call records one decode step on those buffers; every call copies the inputs in, replays,
and returns copies of the outputs. Eagerly a 3B decode step is ~700 small kernel launches, so at batch 1 the GPU
waits on Python; replayed it is one launch and the step runs at the speed of reading the weights.

Capturing: `capture_cuda_graph(fn)` runs `fn` twice on a side stream (warm-up, as torch.cuda.graphs asks), records it
and returns the replay (it raises ValueError for a model that is not on CUDA: there `cuda_graph=True` is an error,
not a no-op). The warm-up runs really execute, which is harmless because a decode step is idempotent: for
the same (token, position) it writes the same keys and values into the same cache column. Recording executes nothing,
so the first replay computes the first step. `capture` is a parameter (any `(fn, device) -> replay`): the CPU tests use
`eager_capture`, which runs the step the same way (twice, then once per replay) without CUDA.

A graph holds the addresses of the parameters and the Python branches taken while it was recorded (attention backend,
LoRA adapters enabled or merged, train/eval mode). In-place parameter updates (optimizer steps) are seen by later
replays. `decoder_for` keys its graphs on a signature of exactly those things (parameter addresses, the adapters'
`enabled`/`merged` flags, the backend, the mode), so replacing parameters or toggling adapters records a new graph
instead of replaying a stale one; `clear(model)` frees them.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable

import torch

from model.layers import get_attention_backend
from model.qwen2_5_vl_generation import decode_step, new_cache

__all__ = ["GraphDecoder", "capture_cuda_graph", "eager_capture", "decoder_for", "clear", "MAX_GRAPHS"]

Capture = Callable[[Callable[[], None], torch.device], Callable[[], None]]
MAX_GRAPHS = 4  # graphs kept per model (each holds a KV cache and a memory pool); the oldest goes first
_GRAPHS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> OrderedDict[(B, L)] -> (sig, decoder)


def capture_cuda_graph(fn: Callable[[], None], device: torch.device) -> Callable[[], None]:
    """Record fn() (which reads and writes only static tensors on `device`) into a CUDA graph; returns its replay."""
    if device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a CUDA model, this one is on {device} (use cuda_graph=False)")
    with torch.cuda.device(device):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    return graph.replay


def eager_capture(fn: Callable[[], None], device: torch.device) -> Callable[[], None]:
    """Stand-in for `capture_cuda_graph` on any device: the same two warm-up runs, then replay = run fn again."""
    fn()
    fn()
    return fn


class GraphDecoder:
    """Callable as `decode_step` without its model argument, bound to its own cache and static buffers."""

    def __init__(self, model, batch: int, max_len: int, capture: Capture | None = None):
        self.model = weakref.ref(model)  # the per-model registry must not keep its model alive
        self.cache = new_cache(model, batch, max_len)
        weight = model.language_model.embed_tokens.weight
        self.token = torch.zeros(batch, dtype=torch.long, device=weight.device)
        self.position = torch.zeros(1, dtype=torch.long, device=weight.device)
        self.logits = torch.zeros(batch, model.config.text.vocab_size, dtype=torch.float32, device=weight.device)
        self.hidden = torch.zeros(batch, model.config.text.hidden_size, dtype=weight.dtype, device=weight.device)
        self.capture = capture if capture is not None else capture_cuda_graph
        self.replay: Callable[[], None] | None = None

    def reset(self) -> None:
        """Empty the cache for a new batch (stale keys are masked anyway; zeros keep every replay alike)."""
        for t in (*self.cache.keys, *self.cache.values, self.cache.key_valid, self.cache.rope_delta):
            t.zero_()

    def step(self) -> None:
        logits, hidden = decode_step(self.model(), self.token, self.cache, self.position)
        self.logits.copy_(logits)
        self.hidden.copy_(hidden)

    @torch.no_grad()
    def __call__(self, token: torch.Tensor, cache, cache_position: torch.Tensor):
        if cache is not self.cache:
            raise ValueError("GraphDecoder runs on its own cache (prefill into decoder.cache)")
        self.token.copy_(token)
        self.position.copy_(cache_position)
        if self.replay is None:
            self.replay = self.capture(self.step, self.token.device)
        self.replay()
        return self.logits.clone(), self.hidden.clone()


def _signature(model) -> tuple:
    flags = tuple((getattr(m, "enabled", None), getattr(m, "merged", None)) for m in model.modules()
                  if hasattr(m, "merged") or hasattr(m, "enabled"))
    params = tuple((p.data_ptr(), p.dtype, tuple(p.shape)) for p in model.parameters())
    return get_attention_backend(), model.training, flags, params


def decoder_for(model, batch: int, max_len: int, capture: Capture | None = None) -> GraphDecoder:
    """The model's GraphDecoder for (batch, max_len), reset, recorded anew when the model changed since."""
    graphs = _GRAPHS.setdefault(model, OrderedDict())
    key = (batch, max_len)
    signature = _signature(model)
    entry = graphs.pop(key, None)
    if entry is None or entry[0] != signature:
        entry = (signature, GraphDecoder(model, batch, max_len, capture))
    graphs[key] = entry
    while len(graphs) > MAX_GRAPHS:
        graphs.popitem(last=False)
    decoder = entry[1]
    decoder.reset()
    return decoder


def clear(model) -> None:
    """Drop the model's recorded graphs and their caches."""
    _GRAPHS.pop(model, None)
