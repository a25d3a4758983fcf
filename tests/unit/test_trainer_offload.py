"""Activation offloading (qlora_trainer.offload): same gradients, reverse-order prefetch, nothing kept.

On CPU the offloader copies with ``clone`` (no side stream), which runs the same bookkeeping as on
a GPU: one host copy per checkpointed layer input, each unpacked once, the next one prefetched. The
CUDA test (side-stream copies, pinned memory) runs where a GPU is present (the device machine).
"""

from __future__ import annotations

import gc

import pytest
import torch

from qlora_trainer.assemble import speed_callbacks
from qlora_trainer.config import TrainingConfig
from qlora_trainer.model import Hardware
from qlora_trainer.offload import ActivationOffloader, install, offload_callback

LAYERS = 3


def tiny_llama(device: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).to(device)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def grads_after_step(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def check_exact(device: str, min_bytes: int) -> ActivationOffloader:
    model = tiny_llama(device)
    ids = torch.randint(0, 128, (2, 16), device=device, generator=None)
    plain = grads_after_step(model, ids)
    offloader = ActivationOffloader(device, min_bytes=min_bytes)
    assert install(model, offloader) == LAYERS
    offloaded = grads_after_step(model, ids)
    assert plain.keys() == offloaded.keys() and len(plain) > 0
    for name in plain:
        assert torch.equal(plain[name], offloaded[name]), name  # copies only: bit for bit
    return offloader


def test_same_gradients_and_reverse_order_prefetch_on_cpu() -> None:
    offloader = check_exact("cpu", min_bytes=1)
    # one layer input per checkpointed layer; the backward needs the last first (fetched on demand),
    # and each unpack starts the copy of the one before it
    assert offloader.stats["offloaded"] == LAYERS
    assert offloader.stats["fetched_on_demand"] == 1
    assert offloader.stats["prefetched"] == LAYERS - 1
    assert offloader.stats["bytes_offloaded"] == LAYERS * 2 * 16 * 64 * 4  # batch x seq x hidden x fp32


def test_small_tensors_stay_and_nothing_outlives_the_graph() -> None:
    model = tiny_llama("cpu")
    big = ActivationOffloader("cpu", min_bytes=1 << 30)
    install(model, big)
    ids = torch.randint(0, 128, (2, 16))
    grads_after_step(model, ids)
    assert big.stats["offloaded"] == 0

    small = ActivationOffloader("cpu", min_bytes=1)
    loss = tiny_llama_with(small)(input_ids=ids, labels=ids).loss
    last = small._last
    assert last is not None and last() is not None  # held by the autograd graph
    del loss
    gc.collect()
    assert last() is None  # a forward without backward keeps no host copy alive


def tiny_llama_with(offloader: ActivationOffloader) -> torch.nn.Module:
    model = tiny_llama("cpu")
    install(model, offloader)
    return model


def test_install_wraps_each_checkpointed_layer_once() -> None:
    model = tiny_llama("cpu")
    offloader = ActivationOffloader("cpu")
    assert install(model, offloader) == LAYERS
    assert install(model, offloader) == 0  # already wrapped
    fresh = tiny_llama("cpu")
    fresh.model.layers[0].gradient_checkpointing = False
    assert install(fresh, ActivationOffloader("cpu")) == LAYERS - 1


def test_callback_installs_at_train_begin() -> None:
    model = tiny_llama("cpu")
    callback = offload_callback("cpu")
    callback.on_train_begin(None, None, None, model=model)
    assert callback.layers == LAYERS
    ids = torch.randint(0, 128, (1, 8))
    grads_after_step(model, ids)
    assert callback.offloader.stats["offloaded"] == 0  # CPU tensors of 2 KiB: under the 1 MiB floor


@pytest.mark.parametrize(
    "device,training,expected",
    [("cuda", {"activationOffloading": True}, 1), ("cpu", {"activationOffloading": True}, 0),
     ("cuda", {"activationOffloading": True, "gradientCheckpointing": False}, 0), ("cuda", {}, 0)],
)
def test_the_trainer_gets_the_offloader_only_on_a_gpu_with_checkpointing(device, training, expected) -> None:
    cfg = TrainingConfig.model_validate({"model": {"uri": "file:///m"}, "dataset": {"uri": "file:///d.jsonl"},
                                         "output": {"uri": "file:///o/"}, "training": training})
    callbacks = speed_callbacks(cfg, Hardware(device, device == "cuda", device))
    assert len(callbacks) == expected
    assert all(cb.offloader.device_type == "cuda" for cb in callbacks)


def test_unknown_device_type_is_refused() -> None:
    with pytest.raises(ValueError, match="device type 'xpu'"):
        ActivationOffloader("xpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")
def test_same_gradients_with_side_stream_copies_on_cuda() -> None:
    offloader = check_exact("cuda", min_bytes=1)
    assert offloader.stats["offloaded"] == LAYERS
    assert offloader.stats["prefetched"] == LAYERS - 1
    assert offloader.stream is not None
