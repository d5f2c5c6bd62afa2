"""FLOPs per token (models/flops.py) against hand counts and against torch's own FLOP counter,
and the MFU meter's arithmetic."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from nested_learning.models import build_model
from nested_learning.models.flops import count_flops, flops_per_token, mean_keys
from nested_learning.train.mfu import MFUMeter, gemm_peak, median_mfu


def test_mean_keys_by_hand():
    assert mean_keys(4, None) == (1 + 2 + 3 + 4) / 4
    assert mean_keys(4, 2) == (1 + 2 + 2 + 2) / 4
    assert mean_keys(3, 10) == 2.0


def test_the_transformer_is_six_times_its_weights_plus_attention():
    m = build_model("transformer", "tiny")
    cfg = m.config
    D, L, V, Hm = cfg.d_model, cfg.n_layers, cfg.vocab_size, cfg.mlp_hidden
    c = count_flops(m, 16)
    assert c.dense == 2 * (V * D + L * (4 * D * D + 2 * D * Hm))
    norms = (2 * L + 1) * D  # RMSNorm weights: parameters without a matrix product
    assert c.dense == 2 * (m.num_parameters() - norms)
    assert c.attention == L * 4 * D * mean_keys(16, None)
    assert c.memory == c.stopped == 0
    assert flops_per_token(m, 16) == 3 * (c.dense + c.attention)


def test_the_dense_count_matches_torchs_flop_counter():
    """torch's counter sees the matrix products and convolutions of a forward (on CPU not the
    masked attention, nor the package's memory ops, which it has no formula for): they are our
    dense term, to the FLOP, for the Transformer and for Titans' maps around its memory op."""
    for name in ("transformer", "titans"):
        m = build_model(name, "tiny").eval()
        B, T = 2, 16
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            m(torch.randint(0, 64, (B, T)))
        c = count_flops(m, T, training=False)
        assert fc.get_total_flops() == B * T * c.dense, name


def test_memory_terms_by_hand():
    hope = build_model("hope", "tiny", cms_periods=[1, 4])
    D, H = hope.config.d_model, hope.config.n_heads
    d, hid, L = D // H, 2 * D, hope.config.n_layers
    c = count_flops(hope, 32)
    assert c.memory == L * 2 * H * d * d * 3  # W q, W a, u k^T
    proj_write = L * 2 * H * (3 * d + 2) * d * 2
    cms_update = L * 2 * 2 * 2 * D * hid  # two levels, two weights
    assert c.stopped == proj_write + cms_update
    assert count_flops(hope, 32, training=False).stopped == proj_write
    titans = build_model("titans", "tiny")
    D, H = titans.config.d_model, titans.config.n_heads
    assert count_flops(titans, 32).memory == titans.config.n_layers * 2 * H * (D // H) ** 2 * 4


def test_mfu_meter():
    m = build_model("hope", "tiny")
    meter = MFUMeter(m, "cpu", peak=1e9)
    flops_s, mfu = meter(1000.0, 32)
    assert flops_s == 1000.0 * flops_per_token(m, 32) and mfu == flops_s / 1e9
    assert median_mfu([{"mfu": 0.1}, {"mfu": 0.3}, {"step": 3}, {"mfu": 0.2}]) == 0.2
    assert gemm_peak("cpu", n=64, repeat=2) > 0
