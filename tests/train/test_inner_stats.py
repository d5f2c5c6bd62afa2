"""The CMS inner optimizers' statistics (train.metrics.inner_stats, UpdateEvent.alpha/.eta_x2)
against hand computations from the inputs the layers were updated with."""

import torch

from nested_learning.layers.cms import CMSChain, CMSConfig, UpdateLog
from nested_learning.layers.teach import TeachCapture
from nested_learning.models import build_model
from nested_learning.train.metrics import inner_stats, inner_updates

B, D, H = 2, 4, 8


def _capture(position, T, zero_up=(), zero_down=(), seed=0):
    """A capture of one level (layer 0, level 0) with random inputs and signals; the listed
    (row, token) inputs are zero (a key of norm 0: eta ||k||^2 = 0 for that token)."""
    g = torch.Generator().manual_seed(seed)
    cap = TeachCapture()
    cap.position = position
    u, a = torch.randn(B, T, D, generator=g, dtype=torch.float64), torch.randn(B, T, H, generator=g, dtype=torch.float64)
    for b, t in zero_up:
        u[b, t] = 0
    for b, t in zero_down:
        a[b, t] = 0
    cap.inputs[("cms", 0, 0, "up")], cap.inputs[("cms", 0, 0, "down")] = u, a
    cap.grads[("cms", 0, 0, "up")] = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    cap.grads[("cms", 0, 0, "down")] = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    return cap


def _unit(x):
    n = x.norm(dim=-1, keepdim=True)
    return torch.where(n > 0, x / n.clamp(min=1e-300), torch.zeros_like(x))


def test_dgd_event_statistics_by_hand_across_calls():
    """Period 2 fed 3 + 3 tokens: the first call completes one chunk (tokens 0, 1; token 2
    waits in the buffer), the second two (buffered token + new token 0, new tokens 1, 2).
    eta_x2 of a chunk = eta * mean over batch, chunk tokens and both layers of ||k_t||^2 with
    k_t = x_t / ||x_t|| (0 for a zero input), eta = min(lr, 1 / period)."""
    lr, alpha = 0.3, 0.8
    chain = CMSChain(CMSConfig(d_model=D, periods=(2,), hidden_mult=H // D, optimizer="dgd", lr=lr, beta=0.9,
                               dgd_alpha=alpha, deep_momentum_hidden=16, teach_scale=1.0, teach_clip=None,
                               differentiable_writes=False)).double()
    state = chain.init_state(B, "cpu", torch.float64)
    W0 = state[0].up.weight.clone()
    eta = min(lr, 1 / 2)

    log = UpdateLog()
    cap1 = _capture(0, 3, zero_up=[(0, 1)], zero_down=[(1, 0)], seed=1)
    state, _ = chain.update(state, cap1, 0, log)
    cap2 = _capture(3, 3, zero_up=[(1, 0)], zero_down=[(0, 2), (1, 2)], seed=2)
    state, _ = chain.update(state, cap2, 0, log)
    events = log.events()

    # the keys' squared norms of the six tokens, in stream order: [layer (up, down), B, 6]
    sq = torch.stack([torch.cat([_unit(c.inputs[("cms", 0, 0, k)]) for c in (cap1, cap2)], 1).square().sum(-1)
                      for k in ("up", "down")])
    want = [eta * float(sq[:, :, 2 * c:2 * c + 2].mean()) for c in range(3)]
    assert [e.token_index for e in events] == [1, 3, 5]
    assert [round(w / eta * 8, 9) for w in want] == [6, 7, 6]  # the zero inputs count as ||k||^2 = 0
    for e, w in zip(events, want):
        assert e.alpha == alpha
        assert abs(e.eta_x2 - w) < 1e-7 * eta, (e.eta_x2, w)  # dgd_inputs divides by a float32 norm
        assert e.update_norm > 0 and e.rows_updated == B

    # alpha and eta are the preconditioner the first chunk's up-layer update applied:
    # W1 = W0 (alpha I - eta K^T K) - eta sum_t (||x_t|| delta_t) k_t^T  (MATH section 4.2)
    x, d = cap1.inputs[("cms", 0, 0, "up")][:, :2], cap1.grads[("cms", 0, 0, "up")][:, :2]
    K = _unit(x)
    S = d * x.norm(dim=-1, keepdim=True)
    W1 = W0 @ (alpha * torch.eye(D, dtype=torch.float64) - eta * K.transpose(1, 2) @ K) - eta * S.transpose(1, 2) @ K
    st1, _ = chain.update(chain.init_state(B, "cpu", torch.float64), cap1, 0, UpdateLog())
    assert float((st1[0].up.weight - W1).abs().max()) < 1e-7  # (float32 key norms in dgd_inputs)


def _hope(**kw):
    torch.manual_seed(0)
    return build_model("hope", "tiny", proj_chunk=4, memory_chunk=8, cms_periods=(1, 4, 8), **kw)


def _reports(model, n=2, T=16):
    """n micro-batches of T tokens through train_forward + apply_updates, state carried:
    [(report, capture)] per micro-batch."""
    g = torch.Generator().manual_seed(3)
    st, out = model.init_state(B), []
    for _ in range(n):
        tok = torch.randint(0, 64, (B, T), generator=g)
        loss, cap, st_after = model.train_forward(tok, st)
        loss.backward()
        st, rep = model.apply_updates(st_after, cap)
        st = st.detach()
        out.append((rep, cap))
    return out


def test_inner_stats_of_a_tiny_hope_by_hand():
    """Level 0 gd, levels 1 and 2 dgd (alpha 0.9, lrs giving eta = 0.25 and 1e-3): `chunks`
    counts the completed chunks (layers x micro-batches x T / period), `updates` those that
    changed a weight (gd's chunk of a micro-batch's last token, which has no target, did not;
    dgd's preconditioner shrinks the weight even then), gd has no alpha, and the
    dgd means are the hand means over every layer's and micro-batch's chunks of
    eta ||x_t / ||x_t|| ||^2, from the very inputs the layers captured."""
    model = _hope(cms_optimizer=("gd", "dgd", "dgd"), cms_lr=(1e-2, 0.5, 1e-3), cms_dgd_alpha=0.9)
    L, T, n = model.config.n_layers, 16, 2
    runs = _reports(model, n, T)
    stats = inner_stats([r for r, _ in runs])
    assert list(stats) == ["level0", "level1", "level2"]
    for lvl, period in enumerate((1, 4, 8)):
        s = stats[f"level{lvl}"]
        assert s["chunks"] == L * n * T // period
        assert s["updates"] == s["chunks"] - (L * n if lvl == 0 else 0)
        events = [e for r, _ in runs for e in r.events if e.level == lvl]
        assert abs(s["update_norm"] - sum(e.update_norm for e in events) / len(events)) < 1e-12
    assert "alpha" not in stats["level0"] and "eta_x2" not in stats["level0"]
    for lvl, eta in ((1, 0.25), (2, 1e-3)):
        period = (1, 4, 8)[lvl]
        per_chunk = []
        for _, cap in runs:
            for i in range(L):
                sq = torch.stack([_unit(cap.inputs[("cms", i, lvl, k)].double()).square().sum(-1)
                                  for k in ("up", "down")])  # [2, B, T]
                per_chunk += [eta * float(c.mean()) for c in sq.split(period, dim=2)]
        s = stats[f"level{lvl}"]
        assert s["alpha"] == 0.9
        assert abs(s["eta_x2"] - sum(per_chunk) / len(per_chunk)) < 1e-6 * eta, (s["eta_x2"], per_chunk[:3])
    # the loop's inner_updates, as it has always counted them
    old = {}
    for r, _ in runs:
        for e in r.events:
            if e.update_norm > 0:
                old[f"level{e.level}"] = old.get(f"level{e.level}", 0) + 1
    assert inner_updates(stats) == old


def test_inner_stats_of_gd_momentum_and_no_reports():
    model = _hope(cms_optimizer=("gd", "momentum", "deep_momentum"))
    runs = _reports(model, 1)
    stats = inner_stats([runs[0][0], None])
    for s in stats.values():
        assert set(s) == {"chunks", "updates", "update_norm"}
    assert all(e.alpha is None and e.eta_x2 is None for e in runs[0][0].events)
    assert inner_stats([]) == {} and inner_updates({}) == {}
    import json

    json.dumps(stats)  # JSON-ready
