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
