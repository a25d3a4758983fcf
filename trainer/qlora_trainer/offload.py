"""Activation offloading whose copies overlap compute (``training.activationOffloading``, issue 9).

With gradient checkpointing each decoder layer keeps one tensor for the backward pass: its input
(``tokens x hidden`` in the compute dtype; ``layers x tokens x hidden x 2`` bytes in all, 2 GiB for
a 32-layer, 4096-wide model at 16 x 512 tokens). Offloading keeps those inputs in pinned host
memory instead of GPU memory.

transformers' ``gradient_checkpointing_enable(offload=True)`` wraps each checkpoint in
``torch.autograd.graph.save_on_cpu``: its device-to-host copy is synchronous, so once per layer
the host waits for the GPU's queue to drain and the GPU then waits for the host to launch the next
kernels; its host-to-device copies run on the compute stream in the backward pass. On an H200
(7B shape, micro-batch 16 x 512) that cost 8 % of the step (``bench/RESULTS.md``).

:class:`ActivationOffloader` makes the same copies on a side CUDA stream:

* forward (``pack``): the side stream waits for the compute stream, copies the layer input into
  pinned host memory without blocking the host, and the device tensor is kept from reuse by the
  caching allocator until that copy ends (``Tensor.record_stream``);
* backward (``unpack``): checkpointed inputs come back in the reverse order of the forward; when
  layer *k*'s input is unpacked (as its recompute starts), the copy of layer *k - 1*'s input back to
  the device starts on the side stream, so it runs during layer *k*'s recompute and backward. The
  compute stream waits on that copy's event only when it needs the tensor.

The values are copies, bit for bit: training computes exactly what it computes without offloading.
Only tensors saved outside the checkpoints' own hooks reach these hooks, i.e. the checkpointed
layers' inputs (``torch.utils.checkpoint``'s non-reentrant ``_NoopSaveInputs``); tensors under
``min_bytes`` stay where they are. The same technique: torchtune's ``OffloadActivations``
(``use_streams=True``), Unsloth's offloaded gradient checkpointing.

On CPU there is nothing to offload (activations already live in host memory); the offloader then
copies with ``clone`` so that its bookkeeping (order, prefetch, release) runs and is tested there.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch

log = logging.getLogger(__name__)

#: Tensors smaller than this stay on their device (copy overhead beats the memory saved): 1 MiB.
MIN_OFFLOAD_BYTES = 1 << 20

#: Marks a layer's checkpoint function already wrapped by :func:`install`.
_WRAPPED = "_qlora_offloaded"


class _Packed:
    """One offloaded tensor: its host copy, and the device copy while one is in flight or in use."""

    __slots__ = ("host", "device", "on_device", "ready", "previous", "__weakref__")

    def __init__(self, host: torch.Tensor, device: torch.device, previous: Any) -> None:
        self.host = host
        self.device = device
        self.on_device: torch.Tensor | None = None
        self.ready: Any = None  # torch.cuda.Event recorded after the host-to-device copy
        self.previous = previous  # weakref to the tensor packed just before this one (prefetched next)


class ActivationOffloader:
    """Saved-tensor hooks that keep large saved tensors in pinned host memory, copied on a side stream.

    ``device_type``: ``cuda`` (copies on a side stream of the saved tensor's device, created at the first
    one) or ``cpu`` (see the module docstring); tensors on other device types are not offloaded.
    ``min_bytes``: smaller tensors are not offloaded (default :data:`MIN_OFFLOAD_BYTES`).
    ``stats``: counts of tensors offloaded, prefetched (copy started before the tensor was needed)
    and fetched on demand, and bytes offloaded; for logs and tests.

    Use :meth:`hooks` around a forward whose backward comes later (it is a
    ``torch.autograd.graph.saved_tensors_hooks`` context); :func:`install` does so for every
    checkpointed decoder layer of a model.
    """

    def __init__(self, device_type: str, min_bytes: int = MIN_OFFLOAD_BYTES) -> None:
        if device_type not in ("cuda", "cpu"):
            raise ValueError(f"activation offloading: device type {device_type!r} is not cuda or cpu")
        self.device_type = device_type
        self.cuda = device_type == "cuda"
        self.min_bytes = int(min_bytes)
        self.stream: Any = None  # torch.cuda.Stream, created on the device of the first tensor offloaded
        self._last: Any = None  # weakref to the most recently packed _Packed
        self.stats = {"offloaded": 0, "prefetched": 0, "fetched_on_demand": 0, "bytes_offloaded": 0}

    @contextlib.contextmanager
    def hooks(self) -> Iterator[None]:
        """Context in which tensors saved for backward go through :meth:`pack` / :meth:`unpack`."""
        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            yield

    def pack(self, tensor: torch.Tensor) -> Any:
        """Start copying ``tensor`` to host memory; returns the handle autograd keeps (or ``tensor`` itself)."""
        nbytes = tensor.numel() * tensor.element_size()
        if (tensor.device.type != self.device_type or tensor.layout != torch.strided or nbytes == 0
                or nbytes < self.min_bytes):
            return tensor
        if self.cuda:
            if self.stream is None:
                self.stream = torch.cuda.Stream(tensor.device)
            compute = torch.cuda.current_stream(tensor.device)
            self.stream.wait_stream(compute)  # the tensor is written by work queued on the compute stream
            with torch.cuda.stream(self.stream):
                host = torch.empty(tensor.size(), dtype=tensor.dtype, pin_memory=True)
                host.copy_(tensor, non_blocking=True)
            tensor.record_stream(self.stream)  # not reused before the copy above has read it
        else:
            host = tensor.detach().clone()
        packed = _Packed(host, tensor.device, self._last)
        self._last = weakref.ref(packed)
        self.stats["offloaded"] += 1
        self.stats["bytes_offloaded"] += nbytes
        return packed

    def unpack(self, packed: Any) -> torch.Tensor:
        """The device tensor for ``packed``; starts the copy of the tensor packed before it (the next one needed)."""
        if not isinstance(packed, _Packed):
            return packed
        if packed.on_device is None:
            self.stats["fetched_on_demand"] += 1
            self._fetch(packed)
        tensor = packed.on_device
        assert tensor is not None
        if self.cuda:
            compute = torch.cuda.current_stream(packed.device)
            compute.wait_event(packed.ready)
            tensor.record_stream(compute)  # allocated on the side stream, used and freed on the compute stream
        packed.on_device, packed.ready = None, None  # autograd holds it from here; a second unpack copies again
        previous = packed.previous() if packed.previous is not None else None
        if previous is not None and previous.on_device is None:
            self.stats["prefetched"] += 1
            self._fetch(previous)
        return tensor

    def _fetch(self, packed: _Packed) -> None:
        """Start the host-to-device copy of ``packed`` (side stream on CUDA)."""
        if self.cuda:
            assert self.stream is not None
            with torch.cuda.stream(self.stream):
                packed.on_device = packed.host.to(packed.device, non_blocking=True)
                packed.ready = torch.cuda.Event()
                packed.ready.record(self.stream)
        else:
            packed.on_device = packed.host.clone()


def offloading_checkpoint(checkpoint_fn: Callable[..., Any], offloader: ActivationOffloader) -> Callable[..., Any]:
    """``checkpoint_fn`` (a layer's ``_gradient_checkpointing_func``) run under ``offloader``'s hooks."""

    @functools.wraps(checkpoint_fn)
    def run(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with offloader.hooks():
            return checkpoint_fn(function, *args, **kwargs)

    setattr(run, _WRAPPED, offloader)
    return run


def install(model: torch.nn.Module, offloader: ActivationOffloader) -> int:
    """Wrap the checkpoint function of every checkpointed layer of ``model`` with ``offloader``'s hooks.

    Call after gradient checkpointing is enabled (transformers' ``gradient_checkpointing_enable`` sets
    ``gradient_checkpointing`` and ``_gradient_checkpointing_func`` on each decoder layer, a
    ``GradientCheckpointingLayer``; those are the layers that call it). Layers
    already wrapped are left alone. Returns the number of layers wrapped now.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    n = 0
    for module in model.modules():
        fn = getattr(module, "_gradient_checkpointing_func", None)
        if (not isinstance(module, GradientCheckpointingLayer) or not module.gradient_checkpointing
                or fn is None or hasattr(fn, _WRAPPED)):
            continue
        module._gradient_checkpointing_func = offloading_checkpoint(fn, offloader)
        n += 1
    return n


def offload_callback(device_type: str) -> Any:
    """A ``TrainerCallback`` that installs an :class:`ActivationOffloader` when training begins.

    The Trainer enables gradient checkpointing inside ``train()``, before ``on_train_begin``, so the
    layers' checkpoint functions exist by then. ``callback.offloader`` keeps the offloader (its stats).
    """
    from transformers import TrainerCallback

    class ActivationOffloadCallback(TrainerCallback):
        def __init__(self) -> None:
            self.offloader = ActivationOffloader(device_type)
            self.layers = 0

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            if model is None:
                return
            self.layers += install(model, self.offloader)
            if self.layers == 0:
                log.warning("activationOffloading: no checkpointed layer found, nothing is offloaded")
            else:
                log.info("activationOffloading: inputs of %d checkpointed layers go to pinned host memory "
                         "(side-stream copies)", self.layers)

    return ActivationOffloadCallback()
