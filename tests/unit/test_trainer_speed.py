"""Speed switches (``qlora_trainer.speed``) compute the same function as the plain path.

The GPU kernel itself (``torch.nn.attention.varlen.varlen_attn``) needs CUDA; here, on CPU,
the padding-free attention path (boundaries from ``cu_seq_lens_q`` or from restarting
``position_ids``, grouped-query heads, output layout) is checked against SDPA with an
explicit block-diagonal causal mask; the GPU kernel is checked by the benchmark's loss
agreement with the reference recipe (``bench/RESULTS.md``).
"""

from __future__ import annotations

import types

import torch

from qlora_trainer.speed import attention_implementation, varlen_attention


def block_causal_reference(query, key, value, lengths, scaling):
    """SDPA over the whole row with a block-diagonal causal mask (what transformers builds on CPU)."""
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    pos = torch.arange(seg.numel())
    mask = (seg[:, None] == seg[None, :]) & (pos[None, :] <= pos[:, None])
    groups = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2)


def test_padding_free_attention_matches_a_block_diagonal_mask():
    torch.manual_seed(0)
    lengths = [5, 1, 9, 3]
    total, heads, kv_heads, dim = sum(lengths), 4, 2, 8
    query = torch.randn(1, heads, total, dim)
    key = torch.randn(1, kv_heads, total, dim)
    value = torch.randn(1, kv_heads, total, dim)
    module = types.SimpleNamespace(sliding_window=None, is_causal=True, num_key_value_groups=heads // kv_heads)
    expected = block_causal_reference(query, key, value, lengths, 0.3)

    cu = torch.tensor([0, 5, 6, 15, 18], dtype=torch.int32)
    got, _ = varlen_attention(module, query, key, value, None, scaling=0.3, cu_seq_lens_q=cu, max_length_q=9)
    assert got.shape == (1, total, heads, dim)
    torch.testing.assert_close(got, expected)

    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    from_positions, _ = varlen_attention(module, query, key, value, None, scaling=0.3, position_ids=position_ids)
    torch.testing.assert_close(from_positions, expected)

    # One unpacked row: plain causal attention over everything (not block-diagonal).
    whole, _ = varlen_attention(module, query, key, value, None, scaling=0.3)
    torch.testing.assert_close(whole, block_causal_reference(query, key, value, [total], 0.3))
    assert not torch.allclose(whole, expected)


def test_attention_implementation_is_sdpa_on_cpu():
    assert attention_implementation(True, "cpu") == "sdpa"
    assert attention_implementation(False, "cuda") == "sdpa"


def _lora_pair(dropout: float = 0.1):
    """Two copies of a tiny two-layer PEFT LoRA model (random LoRA B), the second fused."""
    import copy

    from peft import LoraConfig, get_peft_model

    from qlora_trainer.speed import fuse_lora

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(32, 48, bias=False), torch.nn.Linear(48, 32, bias=False))
    plain = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["0", "1"]))
    for name, param in plain.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    fused = copy.deepcopy(plain)
    assert fuse_lora(fused) == 2
    assert fuse_lora(fused) == 0  # idempotent
    return plain, fused


def _run(model, x, autocast: bool):
    model.zero_grad()
    torch.manual_seed(1)  # the same dropout masks in both models
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = model(x)
    y.float().pow(2).sum().backward()
    return y.float(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_fused_lora_computes_the_same_function_under_autocast():
    """result + scaling * B(A(dropout(x))) as one addmm: equal to PEFT's forward within bf16 rounding."""
    plain, fused = _lora_pair()
    x = torch.randn(2, 5, 32)
    (y0, g0), (y1, g1) = _run(plain, x, True), _run(fused, x, True)
    assert y1.shape == y0.shape == (2, 5, 32)
    assert torch.allclose(y0, y1, rtol=2e-2, atol=2e-2)  # bf16: 2^-8 relative per rounding
    assert set(g0) == set(g1) and all("lora_" in n for n in g0)
    for name in g0:
        assert torch.allclose(g0[name], g1[name], rtol=3e-2, atol=3e-2 * g0[name].abs().max().item()), name


def test_fused_lora_falls_back_to_peft_outside_autocast_and_when_disabled():
    """No autocast (float32, eval), disabled or merged adapters: PEFT's own forward, bit for bit."""
    plain, fused = _lora_pair()
    x = torch.randn(3, 32)
    (y0, g0), (y1, g1) = _run(plain, x, False), _run(fused, x, False)
    assert torch.equal(y0, y1) and all(torch.equal(g0[n], g1[n]) for n in g0)
    with plain.disable_adapter(), fused.disable_adapter(), torch.no_grad():
        assert torch.equal(plain(x), fused(x))
    plain.eval(), fused.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = fused(x).float()
    fused.merge_adapter()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        merged = fused(x).float()  # merged: the base layer alone, which now holds the adapter
    assert torch.allclose(before, merged, rtol=3e-2, atol=3e-2)


def test_build_model_fuses_lora_on_gpus_only(monkeypatch):
    """``training.fusedLora`` patches the LoRA layers on CUDA, never on CPU (the CPU trainer runs PEFT's forward)."""
    from qlora_trainer import assemble
    from qlora_trainer.config import TrainingConfig
    from qlora_trainer.model import Hardware

    calls = []
    monkeypatch.setattr(assemble, "load_base_4bit", lambda *a, **k: torch.nn.Sequential(torch.nn.Linear(8, 8)))
    monkeypatch.setattr(assemble, "fuse_lora", lambda model: calls.append(model) or 1)
    import peft

    monkeypatch.setattr(peft, "get_peft_model", lambda model, cfg: model)
    monkeypatch.setattr(assemble, "adapter_to_float32", lambda model: None)

    def cfg(**training):
        return TrainingConfig.model_validate({
            "model": {"uri": "file:///m"}, "dataset": {"uri": "file:///d.jsonl"}, "output": {"uri": "file:///o"},
            "training": training,
        })

    assert cfg().training.fused_lora is True
    assemble.build_model(cfg(), None, torch.float32, Hardware("cpu", False, "cpu"))
    assert calls == []
    assemble.build_model(cfg(), None, torch.bfloat16, Hardware("cuda", True, "gpu"))
    assert len(calls) == 1
    assemble.build_model(cfg(fusedLora=False), None, torch.bfloat16, Hardware("cuda", True, "gpu"))
    assert len(calls) == 1
