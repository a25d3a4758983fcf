"""Selective gradient checkpointing (``training.checkpointLayers``) and the CUDA allocator default.

* The layer choice: :func:`qlora_trainer.estimate.checkpoint_layout` leaves the most layers
  unchecked whose estimate fits the budget, and none with ``all``, without checkpointing or on a
  GPU too small for one.
* The numerics: on a tiny Llama with LoRA dropout (CPU, float32), the loss and every LoRA
  gradient are the same with no checkpointing, every layer checkpointed and the last layers
  unchecked, and the unchecked layers really skip their recompute forward.
* ``qlora_trainer.speed.allocator_env`` sets ``expandable_segments:True`` only where the
  environment names no allocator settings.
"""

from __future__ import annotations

import types

import pytest
import torch

from helpers import MISTRAL_7B
from qlora_trainer.config import TrainingConfig
from qlora_trainer.estimate import AUTO_MICRO_BATCH_SHARE, checkpoint_layout, estimate, micro_batch_layout


def config(**training) -> TrainingConfig:
    return TrainingConfig.model_validate(
        {
            "model": {"uri": "file:///models/m"},
            "dataset": {"uri": "file:///data/train.jsonl"},
            "output": {"uri": "file:///out/"},
            "quantization": {"computeDtype": "bfloat16"},
            "training": training,
        }
    )


def test_default_is_auto():
    assert config().training.checkpoint_layers == "auto"
    assert config(checkpointLayers="all").training.checkpoint_layers == "all"
    with pytest.raises(Exception, match="checkpointLayers"):
        config(checkpointLayers="some")


def test_each_unchecked_layer_adds_its_saved_tensors_to_the_estimate():
    cfg = config(microBatchSize=16, gradientAccumulationSteps=1)
    peaks = [estimate(MISTRAL_7B, cfg, unchecked_layers=k).allocated_gib for k in (0, 1, 2, 32)]
    step = peaks[2] - peaks[1]
    assert step > 0.5  # 16 x 512 tokens of a 7B layer's saved tensors: about 1.1 GiB
    assert peaks[1] - peaks[0] == pytest.approx(step, rel=0.05)  # the first one also drops the recompute buffers
    no_gc = estimate(MISTRAL_7B, config(microBatchSize=16, gradientCheckpointing=False)).allocated_gib
    assert peaks[3] == pytest.approx(no_gc, rel=1e-6)  # every layer unchecked = no checkpointing
    assert estimate(MISTRAL_7B, cfg, unchecked_layers=99).allocated_gib == peaks[3]  # clipped to the layers


@pytest.mark.parametrize("gpu_gib", [79.1, 40.0, 24.0, 16.0])
def test_checkpoint_layout_takes_the_most_layers_that_fit(gpu_gib):
    cfg = config(microBatchSize=16, gradientAccumulationSteps=1)
    k, gib, why = checkpoint_layout(MISTRAL_7B, cfg, micro_batch_size=16, gpu_gib=gpu_gib)
    budget = AUTO_MICRO_BATCH_SHARE * gpu_gib

    def peak(n: int) -> float:
        return estimate(MISTRAL_7B, cfg, micro_batch_size=16, gpu_gib=gpu_gib, unchecked_layers=n).needed_gib

    assert 0 <= k <= 32
    if k:
        assert peak(k) <= budget and gib == pytest.approx(peak(k))
        assert f"last {k} of 32" in why
    if k < 32:
        assert peak(k + 1) > budget
    expected = {79.1: 29, 40.0: 12, 24.0: 5}  # the default all-linear r=16 adapter, paged 8-bit AdamW
    if gpu_gib in expected:
        assert k == expected[gpu_gib]


def test_checkpoint_layout_keeps_every_layer_checkpointed_when_told_or_when_nothing_fits():
    assert checkpoint_layout(MISTRAL_7B, config(checkpointLayers="all"), micro_batch_size=16, gpu_gib=80)[0] == 0
    assert checkpoint_layout(MISTRAL_7B, config(gradientCheckpointing=False), micro_batch_size=16, gpu_gib=80)[0] == 0
    k, _, why = checkpoint_layout(MISTRAL_7B, config(), micro_batch_size=16, gpu_gib=11.0)
    assert k == 0 and "all layers checkpointed" in why


def test_micro_batch_layout_chooses_the_layers_after_the_micro_batch():
    cfg = config(microBatchSize=4, gradientAccumulationSteps=4)
    layout = micro_batch_layout(MISTRAL_7B, cfg, gpu_gib=40.0)
    assert (layout.micro_batch_size, layout.gradient_accumulation_steps) == (16, 1)
    assert layout.unchecked_layers == checkpoint_layout(MISTRAL_7B, cfg, micro_batch_size=16, gpu_gib=40.0)[0] == 12
    assert layout.summary()["uncheckpointedLayers"] == 12
    # A resumed run keeps its micro-batch; the layers are chosen for that micro-batch.
    kept = micro_batch_layout(MISTRAL_7B, cfg, gpu_gib=40.0, kept=(4, 4))
    assert (kept.micro_batch_size, kept.gradient_accumulation_steps) == (4, 4)
    assert kept.unchecked_layers == checkpoint_layout(MISTRAL_7B, cfg, micro_batch_size=4, gpu_gib=40.0)[0]
    assert kept.unchecked_layers > layout.unchecked_layers
    off = micro_batch_layout(MISTRAL_7B, config(microBatchSize=4, gradientAccumulationSteps=4, checkpointLayers="all"),
                             gpu_gib=40.0)
    assert off.unchecked_layers == 0 and (off.micro_batch_size, off.gradient_accumulation_steps) == (16, 1)


def test_on_cpu_every_layer_stays_checkpointed():
    from qlora_trainer.assemble import micro_batch_layout_for, speed_callbacks
    from qlora_trainer.model import Hardware

    cfg = config(microBatchSize=4, gradientAccumulationSteps=4, activationOffloading=True)
    cpu = Hardware("cpu", False, "cpu")
    assert micro_batch_layout_for(cfg, MISTRAL_7B, cpu).unchecked_layers == 0
    assert speed_callbacks(cfg, cpu, 3) == []
    gpu = speed_callbacks(cfg, Hardware("cuda", True, "gpu"), 3)
    # The layer switch comes first, so the offloader wraps only the layers still checkpointed.
    assert [type(c).__name__ for c in gpu] == ["CheckpointLayersCallback", "ActivationOffloadCallback"]
    assert [type(c).__name__ for c in speed_callbacks(config(), Hardware("cuda", True, "gpu"), 0)] == []


def _tiny_lora_llama():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation="sdpa",
    ))
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2,
                                              target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    model.train()
    return model


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout masks in every run
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_unchecked_layers_compute_the_same_function_and_skip_the_recompute():
    from transformers.modeling_layers import GradientCheckpointingLayer

    from qlora_trainer.speed import checkpoint_layers_callback

    model = _tiny_lora_llama()
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert len(layers) == 4
    calls = [0] * len(layers)
    for i, layer in enumerate(layers):
        # A pre-hook: the recompute stops early once it has rebuilt the tensors the backward needs
        # (torch.utils.checkpoint's early stop), so a hook after the layer's forward would not see it.
        layer.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))

    plain_loss, plain_grads = _loss_and_grads(model, ids)
    assert calls == [1, 1, 1, 1]

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    calls[:] = [0] * 4
    all_loss, all_grads = _loss_and_grads(model, ids)
    assert calls == [2, 2, 2, 2]  # every layer recomputed in the backward pass

    callback = checkpoint_layers_callback(2)
    callback.on_train_begin(types.SimpleNamespace(gradient_checkpointing=True), None, None, model=model)
    assert callback.unchecked == 2
    assert [layer.gradient_checkpointing for layer in layers] == [True, True, False, False]
    calls[:] = [0] * 4
    some_loss, some_grads = _loss_and_grads(model, ids)
    assert calls == [2, 2, 1, 1]  # the last two keep their activations: no recompute

    for loss in (all_loss, some_loss):
        torch.testing.assert_close(loss, plain_loss, rtol=0, atol=0)
    for grads in (all_grads, some_grads):
        assert grads.keys() == plain_grads.keys() and len(grads) == 4 * 4 * 2
        for name, grad in grads.items():
            torch.testing.assert_close(grad, plain_grads[name], rtol=1e-6, atol=1e-7, msg=name)


def test_allocator_env_is_set_only_where_nothing_is_named():
    from qlora_trainer.speed import CUDA_ALLOC_CONF, allocator_env

    env: dict[str, str] = {"PATH": "/bin"}
    assert allocator_env(env) == CUDA_ALLOC_CONF == "expandable_segments:True"
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    for named in ({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}, {"PYTORCH_CUDA_ALLOC_CONF": ""},
                  {"PYTORCH_ALLOC_CONF": "expandable_segments:False"}):
        kept = dict(named)
        assert allocator_env(kept) is None
        assert kept == named
