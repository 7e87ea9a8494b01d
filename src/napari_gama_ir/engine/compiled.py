"""Optional faster inference paths, each checked against eager and never fatal.

- :class:`CompiledNetwork`: ``torch.compile`` (inductor, weights frozen), on any device; on CUDA
  optionally replayed as CUDA graphs.
- :class:`GraphedNetwork`: CUDA graphs of the eager network, one captured pass per input shape, on CUDA.
- :class:`CudaGraphs`: the capture and replay that both use.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import nn

from .device import is_out_of_memory

# Largest difference to the eager network that an optimised network may show, relative to the size
# of the output: the 1e-3 for float32; autocast rounds each path its own way.
TOLERANCE = {None: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}


class CheckedNetwork:
    """A faster way to run ``model`` that proves itself on each new input shape.

    Subclasses implement :meth:`_optimised`. Each new input shape's first output is compared with
    the eager network's; a failure (any exception but running out of memory) or a difference above
    :data:`TOLERANCE` switches to the eager network for good, with a warning. Out-of-memory errors
    propagate, so the engine can still shrink the batch or tile and try again.

    Call it under ``torch.inference_mode()`` or ``torch.no_grad()``; it is for inference only.
    """

    what = "the optimised path"  # named in the fallback warning

    def __init__(self, model: nn.Module, autocast_dtype: torch.dtype | None = None) -> None:
        self.model = model
        self.autocast_dtype = autocast_dtype
        self.tolerance = TOLERANCE[autocast_dtype]
        self.active = True
        self._checked_shapes: set[tuple[int, ...]] = set()
        self._padded_shapes: set[tuple[int, ...]] = set()

    def _optimised(self, inputs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def batch_to_run(self, shape: tuple[int, ...], most: int, planned: int | None = None) -> int:
        """How many inputs to run for a batch of ``shape``: its own count or, the first time a new
        count comes, the smallest larger one up to ``most`` that is already run for inputs of that
        size or is ``planned`` (the caller's full batch, which may not have come yet).

        Each new shape is compiled (tens of seconds on a CPU) or captured anew. Padding avoids that
        for a shape that comes once, such as the last, shorter chunk of a stack of small planes or
        the shorter last batch of one plane's tiles. A shape that comes again (a shorter batch in
        every plane of a stack) is compiled then: padding it every time would cost a long stack
        more than one compilation.
        """
        count, size = shape[0], tuple(shape[1:])
        if not self.active or shape in self._checked_shapes or shape in self._padded_shapes:
            return count
        larger = {known[0] for known in self._checked_shapes if known[1:] == size} | {planned or 0}
        larger = [other for other in larger if count < other <= most]
        if not larger:
            return count
        self._padded_shapes.add(shape)
        return min(larger)

    def _fall_back(self, reason: str) -> None:
        self.active = False
        warnings.warn(f"{self.what} is not used ({reason}); running the network eagerly", RuntimeWarning, stacklevel=3)

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return self.model(inputs)
        try:
            outputs = self._optimised(inputs)
        except Exception as error:  # a missing C++ compiler, an unsupported operator, ...
            if is_out_of_memory(error):
                raise
            first_line = (str(error).strip().splitlines() or [""])[0]
            self._fall_back(f"{type(error).__name__}: {first_line}")
            return self.model(inputs)
        shape = tuple(inputs.shape)
        if shape not in self._checked_shapes:
            reference = self.model(inputs)
            scale = max(1.0, float(reference.float().abs().max()))
            difference = float((outputs.float() - reference.float()).abs().max())
            if not difference <= self.tolerance * scale:  # also catches NaN
                self._fall_back(f"its output differs from eager by {difference:.3g} for shape {shape}")
                return reference
            self._checked_shapes.add(shape)
        return outputs


class CompiledNetwork(CheckedNetwork):
    """Runs a network through ``torch.compile`` (inductor, weights frozen), falling back to eager.

    Freezing lets inductor treat the weights as constants: it pre-packs convolution weights and
    fuses the elementwise work of LayerNorm, SimpleGate, GAMA and the scaled residuals into few
    passes over memory. How much that buys depends on the network and the machine
    (docs/performance.md has the figures measured). Each new input shape is compiled once (tens of
    seconds on a CPU).

    With ``cuda_graphs=True`` each compiled pass is also captured as a CUDA graph and replayed
    (:class:`CudaGraphs`): the fused kernels without one Python launch each (on an H200 a compiled
    GAMA-IR-S pass at 256 x 256 took as long to issue as to run). The capture is ours, not
    inductor's ``mode="reduce-overhead"``: inductor keeps its graph trees per thread, and before the
    fix of pytorch/pytorch#123177 (which torch 2.13 has) they failed in threads Python started,
    which is where the engine runs its network; our graphs replay from any thread.
    """

    what = "torch.compile"

    def __init__(self, model: nn.Module, autocast_dtype: torch.dtype | None = None, cuda_graphs: bool = False) -> None:
        super().__init__(model, autocast_dtype)
        self.cuda_graphs = cuda_graphs
        # dynamic=False: the engine's tiles share one shape, for which static code is fastest.
        self._compiled = torch.compile(model, dynamic=False)
        self._graphs = CudaGraphs(self._compiled, autocast_dtype) if cuda_graphs else None

    def _optimised(self, inputs: torch.Tensor) -> torch.Tensor:
        import torch._inductor.config as inductor_config

        # Compilation happens at the first call of each shape (for graphs, in the capture's warm-up).
        with inductor_config.patch(freezing=True):
            return self._graphs(inputs) if self._graphs is not None else self._compiled(inputs)


# Passes on a side stream before a capture: CUDA requires it, and it lets cuDNN pick its
# algorithms, a compiled network compile, and the allocator reach its steady state outside the graph.
GRAPH_WARMUP_PASSES = 3
# Most input shapes one network keeps CUDA graphs for; further shapes run without. Each graph holds
# its static input and output on the device, and a kept runner (runner.runner_for) restoring
# pictures of many sizes, each run whole at a shape of its own, would gather graphs without end.
MOST_GRAPHS = 16


class CudaGraphs:
    """Replays ``function`` (a network, eager or compiled) as CUDA graphs, one captured per input shape.

    An eager pass of GAMA-IR-S is hundreds of small kernels, each launched from Python: at the
    engine's batches of a few tiles the GPU waits on the launches, and on the GIL that the engine's
    other threads also want (docs/performance.md, "GPU"). A graph replays the whole pass with one
    launch. Inputs are copied into the graph's static input and outputs copied out of its static
    output, so a caller may keep an output while the next batch runs. Shapes beyond the first
    :data:`MOST_GRAPHS` run through ``function`` directly. The graphs share one memory
    pool; the engine's runner never replays two at once (its lock). Autocast runs inside the
    capture with its weight-cast cache off, as CUDA graphs require.
    """

    def __init__(self, function: Callable[[torch.Tensor], torch.Tensor], autocast_dtype: torch.dtype | None = None):
        self.function = function
        self.autocast_dtype = autocast_dtype
        self._replays: dict[tuple, Callable[[torch.Tensor], torch.Tensor]] = {}
        self._pool = None

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        key = (tuple(inputs.shape), inputs.stride(), inputs.dtype)
        replay = self._replays.get(key)
        if replay is None:
            if len(self._replays) >= MOST_GRAPHS:
                return self.function(inputs)
            replay = self._replays[key] = self._capture(inputs)
        return replay(inputs)

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast("cuda", dtype=self.autocast_dtype, cache_enabled=False)

    def _capture(self, inputs: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """Record one pass on inputs shaped like ``inputs``; return what replays it on new inputs."""
        static_input = inputs.clone()  # same shape, strides and device
        side = torch.cuda.Stream(device=inputs.device)
        side.wait_stream(torch.cuda.current_stream(inputs.device))
        with torch.cuda.stream(side), self._autocast():
            for _ in range(GRAPH_WARMUP_PASSES):
                self.function(static_input)
        torch.cuda.current_stream(inputs.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads (a napari preview, say) may use the device meanwhile.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"), self._autocast():
            static_output = self.function(static_input)

        def replay(new_inputs: torch.Tensor) -> torch.Tensor:
            static_input.copy_(new_inputs)
            graph.replay()
            return static_output.clone()

        return replay


class GraphedNetwork(CheckedNetwork):
    """Runs the eager network on CUDA as CUDA graphs (:class:`CudaGraphs`), checked against eager."""

    what = "CUDA graphs"

    def __init__(self, model: nn.Module, autocast_dtype: torch.dtype | None = None) -> None:
        super().__init__(model, autocast_dtype)
        self._graphs = CudaGraphs(model, autocast_dtype)

    def _optimised(self, inputs: torch.Tensor) -> torch.Tensor:
        return self._graphs(inputs)


def network_for(
    model: nn.Module, device: torch.device, autocast_dtype: torch.dtype | None, compile: bool = False,
    cuda_graphs: bool | None = False,
) -> nn.Module | CheckedNetwork:
    """``model`` itself, or wrapped in the optimised path asked for (graphs on CUDA only).

    ``cuda_graphs=None`` chooses: graphs of the eager network on CUDA, none elsewhere, and none
    with ``compile`` unless asked (capturing compiled passes adds to the compile time).
    """
    if cuda_graphs is None:
        cuda_graphs = device.type == "cuda" and not compile
    if cuda_graphs and device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device, not {device}")
    if compile:
        return CompiledNetwork(model, autocast_dtype, cuda_graphs)
    if cuda_graphs:
        return GraphedNetwork(model, autocast_dtype)
    return model
