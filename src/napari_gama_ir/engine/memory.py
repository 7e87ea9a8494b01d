"""The host memory a CPU forward pass takes, checked before the pass runs.

On a GPU a pass that does not fit raises torch's out-of-memory error, and the runner retries it
smaller. On the CPU, Linux hands a process all the memory it asks for and kills it once there is
none left: a whole 4096 x 4096 plane through GAMA-IR-S (about 26 GB of feature maps) had the
command killed after 20 s on a 24 GB machine, with no message, and inside napari it would take
the viewer down with it. So the engine estimates a large pass's memory from the network itself
(:func:`forward_peak_bytes`, nothing computed) and checks it against the memory available
(:func:`memory_for_pass`), which fails it as out of memory when it cannot fit.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .device import HostMemoryError, available_memory
from .heap import heap_handed_back_count, heap_returned_while_kept, release_freed_heap

# Share of the memory available that may be planned on: measured peaks ran up to 6% above the
# estimate (docs/performance.md, "Planes in blocks"), and a job over its limit is killed.
USABLE_SHARE = 0.9
# How far the process's resident set may rise in one pass, as a multiple of torch's own peak, with
# freed heap memory kept for reuse (heap.heap_kept_for_reuse): up to 2.8x measured in one pass
# (GAMA-IR-S, 2048 x 2048 RGB), and 1.0x with the heap handed back (docs/performance.md, "The
# memory of one large pass on the CPU"). Pass after pass the kept heap grew on, to 3.0x for
# GAMA-IR-XS at 2048 after 12 passes, by at most 0.65x a pass after the first (training steps
# 0.43x); each large pass is checked anew, and the heap's free pages handed back when room runs
# short, so only one pass's rise needs room. Training steps rose by up to 1.23x with the heap
# handed back (docs/performance.md, "The memory of a training step on the CPU").
KEPT_HEAP_GROWTH = 3.0
RETURNED_HEAP_GROWTH = 1.25

# (heap_handed_back_count(), peak): the largest pass run with the heap kept since the last hand-back.
_kept_pass = (-1, 0)


# A training step's loss: the network (a copy on the meta device) on a batch of images.
StepLoss = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def run_on_meta(
    model: nn.Module, shape: tuple[int, ...], mode: AbstractContextManager, backward: bool = False,
    loss: StepLoss | None = None,
) -> None:
    """One forward pass of a copy of ``model`` on the meta device, on an input of ``shape``, inside
    ``mode`` (a counter of FLOPs or of memory): shapes are worked out, nothing is computed. With
    ``backward``, the copy is in training mode and the pass is followed by the backward pass of
    ``loss`` (default: the mean of the output), as in a training step."""
    meta, inputs = copy.deepcopy(model).to("meta").train(backward), torch.empty(shape, device="meta")
    # Not inference_mode: torch 2.3's FLOP counter then counts nothing.
    with mode, torch.set_grad_enabled(backward):
        if not backward:
            meta(inputs)
        else:
            (meta(inputs).mean() if loss is None else loss(meta, inputs)).backward()


class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of the tensors that operations made and that are still alive, and the most
    at once: what torch's allocator holds for the feature maps of a pass. Views share their base's
    storage and are counted once; a storage is let go when Python frees its last tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._counted: set[int] = set()

    def _release(self, key: int, size: int) -> None:
        self._counted.discard(key)
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(result)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            if id(storage) in self._counted:
                continue
            self._counted.add(id(storage))
            self.live += storage.nbytes()
            weakref.finalize(storage, self._release, id(storage), storage.nbytes())
        self.peak = max(self.peak, self.live)
        return result


def forward_peak_bytes(model: nn.Module, shape: tuple[int, ...]) -> int:
    """The most bytes the tensors of one eager float32 forward pass of ``model`` on an input of
    ``shape`` hold at once, the output included, the weights and the input not: torch's own peak
    for the pass, worked out on the meta device in well under a second (the first call in a
    process loads torch's shape functions: about a second more).

    For GAMA-IR-S it is 1,558 bytes a pixel at every size (64 x 64 to 2048 x 2048, batches of 1 and
    4), and the process's resident set rose by 1.0-1.2 times that where freed memory goes back to
    the system (1.66-1.89 GB against 1.63 at 1024 x 1024, 6.60 against 6.53 at 2048 x 2048 RGB).
    """
    counter = _LiveBytes()
    run_on_meta(model, shape, counter)
    return counter.peak


def training_step_peak_bytes(model: nn.Module, shape: tuple[int, ...], loss: StepLoss | None = None) -> int:
    """The most bytes one float32 training step of ``model`` on a batch of ``shape`` holds at once:
    the feature maps the forward pass keeps for the backward pass, the gradients, and AdamW's two
    moments (twice the weights), worked out on the meta device as :func:`forward_peak_bytes` is.
    ``loss`` is the step's (default: the mean of the network's output); it must run on the meta device.
    """
    counter = _LiveBytes()
    run_on_meta(model, shape, counter, backward=True, loss=loss)
    weights = sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())
    return counter.peak + 2 * weights


def _room() -> int | None:
    available = available_memory()
    return None if available is None else int(available * USABLE_SHARE)


@contextmanager
def memory_for_pass(peak_bytes: int, what: str) -> Iterator[bool]:
    """Run a CPU pass whose tensors peak at ``peak_bytes`` (:func:`forward_peak_bytes`) inside this,
    as the memory available allows; yields whether freed heap memory stays kept for reuse.

    Where the pass fits even as the kept heap grows it (:data:`KEPT_HEAP_GROWTH`), or a pass at
    least as large ran with the heap kept since its free pages were last handed back and this one
    fits as one with them handed back would (:data:`RETURNED_HEAP_GROWTH`), nothing changes. Where
    it does not, the heap's free pages are handed back (the system counts them as used) and it is
    judged again. Where it fits only with the heap handed back, it runs so
    (:func:`~.heap.heap_returned_while_kept`): slower (1.25-1.5x for GAMA-IR-S at 2048 x 2048), in
    a third of the memory or less.

    Raises
    ------
    HostMemoryError
        Where not even that fits: the pass, ``what`` (e.g. "a forward pass of shape 1x1x4096x4096"), would
        end with the process killed.
    """
    global _kept_pass
    room = _room()
    handed_back, kept_peak = _kept_pass
    # The system counts a kept heap's free pages as used, and a pass no larger than one that left
    # them reuses them: it needs room only for what the heap grows by (up to 0.65x the peak
    # measured), less than a pass with the heap handed back takes. So pass after pass of one size
    # (training steps, the tiles of a plane) keeps its heap instead of handing it back each time.
    reusing = handed_back == heap_handed_back_count() and peak_bytes <= kept_peak
    if room is None or (RETURNED_HEAP_GROWTH if reusing else KEPT_HEAP_GROWTH) * peak_bytes <= room:
        if room is not None:
            _kept_pass = heap_handed_back_count(), kept_peak if reusing else peak_bytes
        yield True
        return
    release_freed_heap()
    room = _room()
    if KEPT_HEAP_GROWTH * peak_bytes <= room:
        _kept_pass = heap_handed_back_count(), peak_bytes
        yield True
        return
    if RETURNED_HEAP_GROWTH * peak_bytes > room:
        raise HostMemoryError(
            f"{what} takes about {RETURNED_HEAP_GROWTH * peak_bytes / 1e9:.1f} GB of memory, "
            f"and {room / USABLE_SHARE / 1e9:.1f} GB is available"
        )
    with heap_returned_while_kept():
        yield False
