"""Benchmark cases: one per op and shape, each building its inputs and a run function.

A case's `run(backend)` executes the op (forward, or forward + backward when the case says
so) and returns every output and input gradient, so the runner can time it and compare it
with the float64 reference on the same inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from nested_learning import ops


@dataclass
class Case:
    op: str
    shape: dict
    tokens: int
    backward: bool
    make: Callable[[torch.device, torch.dtype], Callable[[str], list[torch.Tensor]]]
    # peer packages timed on the same shapes: name -> (available?, make(dev, dtype) -> run()),
    # run() returning the outputs that correspond to the first outputs of `make`'s run
    peers: dict = field(default_factory=dict)
    mode: str = ""  # "fwd", "fwd+bwd", or a description such as "token by token"
    # the implementations to time, reference first, where they are not the op's registered
    # backends (deep momentum's factored form and reference); None: ops.available_backends
    backends: tuple[str, ...] | None = None

    @property
    def shape_str(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.shape.items())


def _grads(outs, inputs, backward):
    """Sum of all outputs backpropagated; returns outputs + input gradients."""
    flat = [o for o in outs if o is not None and o.is_floating_point()]
    if not backward:
        return [o.detach() for o in flat]
    leaves = [x for x in inputs if x is not None and x.requires_grad]
    tot = sum((o.float() * torch.linspace(0.5, 1.5, o.numel(), device=o.device).view_as(o)).sum()
              for o in flat)
    gs = torch.autograd.grad(tot, leaves, allow_unused=True)
    return [o.detach() for o in flat] + [g for g in gs if g is not None]


def _leaf(x, dtype, grad):
    return x.to(dtype).detach().requires_grad_(grad)


def _dgd_base(B, T, H, d):
    g = torch.Generator(device="cpu").manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(q=r(B, T, H, d), k=F.normalize(r(B, T, H, d), dim=-1), w=r(B, T, H, d),
                alpha=0.9 + 0.1 * torch.rand(B, T, H, generator=g),
                eta=torch.rand(B, T, H, generator=g), initial_state=r(B, H, d, d))


def _dgd_leaves(B, T, H, d, dev, dtype, grad):
    gate = lambda n: n in ("alpha", "eta", "initial_state")  # noqa: E731
    return {n: _leaf(v.to(dev), torch.float32 if gate(n) and dtype != torch.float64 else dtype, grad)
            for n, v in _dgd_base(B, T, H, d).items()}


def _fla_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("fla") is not None


def dgd_case(B, T, H, d, chunk=64, backward=True):
    """a = k and read="after": the gated delta rule's setting, so fla can be timed beside it."""
    def make(dev, dtype):
        x = _dgd_leaves(B, T, H, d, dev, dtype, backward)

        def run(backend):
            o, s = ops.dgd_update(**x, read="after", chunk_size=chunk, backend=backend)
            return _grads([o, s], list(x.values()), backward)
        return run

    def make_fla(dev, dtype):
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        x = _dgd_leaves(B, T, H, d, dev, dtype, backward)
        beta = (x["eta"] / x["alpha"]).detach().requires_grad_(backward)
        v = (x["w"] / beta[..., None].to(dtype)).detach().requires_grad_(backward)
        g = x["alpha"].log().detach().requires_grad_(backward)
        h0 = x["initial_state"].transpose(-1, -2).contiguous().detach().requires_grad_(backward)

        def run():
            o, s = chunk_gated_delta_rule(x["q"], x["k"], v, g=g, beta=beta, scale=1.0, initial_state=h0,
                                          output_final_state=True)
            return _grads([o, s.transpose(-1, -2)], [x["q"], x["k"], v, g, beta, h0], backward)[:2]
        return run
    return Case("dgd_update", dict(B=B, T=T, H=H, d=d, chunk=chunk), B * T, backward, make,
                peers={"fla.chunk_gated_delta_rule": (_fla_available, make_fla)})


def dgd_stream_case(B, steps, H, d):
    """Generation: `steps` calls of one token each, the state carried from call to call."""
    def make(dev, dtype):
        x = _dgd_leaves(B, steps, H, d, dev, dtype, False)

        def run(backend):
            S, outs = x["initial_state"], []
            for t in range(steps):
                xt = {n: x[n][:, t:t + 1] for n in ("q", "k", "w", "alpha", "eta")}
                o, S = ops.dgd_update(**xt, initial_state=S, backend=backend)
                outs.append(o)
            return [torch.cat(outs, 1), S]
        return run
    return Case("dgd_update", dict(B=B, steps=steps, H=H, d=d), B * steps, False, make, mode="token by token")


def _titan_base(B, T, H, d, g):
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    u = lambda: torch.rand(B, T, H, generator=g)  # noqa: E731
    return dict(q=F.normalize(r(B, T, H, d), dim=-1), k=F.normalize(r(B, T, H, d), dim=-1),
                v=r(B, T, H, d), theta=0.1 * u(), eta=0.9 * u(), alpha=0.05 * u())


def titan_case(B, T, H, d, chunk=16, backward=True):
    def make(dev, dtype):
        g = torch.Generator().manual_seed(0)
        x = {n: _leaf(v.to(dev), dtype, backward) for n, v in _titan_base(B, T, H, d, g).items()}

        def run(backend):
            o, (M, S) = ops.titan_update(**x, chunk_size=chunk, backend=backend)
            return _grads([o, M, S], list(x.values()), backward)
        return run
    return Case("titan_update", dict(B=B, T=T, H=H, d=d, chunk=chunk), B * T, backward, make)


def titan_mlp_case(B, T, H, d, hidden, chunk=16, backward=True):
    def make(dev, dtype):
        g = torch.Generator().manual_seed(0)
        x = {n: _leaf(v.to(dev), dtype, backward) for n, v in _titan_base(B, T, H, d, g).items()}
        W1 = _leaf((torch.randn(B, H, d, hidden, generator=g) / hidden**0.5).to(dev), dtype, backward)
        W2 = _leaf((torch.randn(B, H, hidden, d, generator=g) / d**0.5).to(dev), dtype, backward)

        def run(backend):
            o, st = ops.titan_mlp_update(**x, initial_state=(W1, W2), chunk_size=chunk, backend=backend)
            return _grads([o, *st], [*x.values(), W1, W2], backward)
        return run
    return Case("titan_mlp_update", dict(B=B, T=T, H=H, d=d, hidden=hidden, chunk=chunk), B * T,
                backward, make)


def _selfmod_base(B, T, H, d, g):
    P = torch.randn(B, H, 3 * d + 2, d, generator=g) / d**0.5
    P[:, :, 3 * d:] *= 0.1
    return dict(x=torch.randn(B, T, H, d, generator=g), P=P, gate_bias=torch.tensor([[0.0, 8.0]]).repeat(H, 1))  # the layer's initial biases


def selfmod_case(B, T, H, d, chunk=16, backward=True):
    """The HOPE mixer's projection recurrence (stop-gradient writes, its default); the peer is the
    layer's per-chunk loop that the op replaced (an einsum, the gates and one dgd_update per chunk)."""
    def leaves(dev, dtype):
        g = torch.Generator().manual_seed(0)
        x = {n: _leaf(v.to(dev), dtype, backward) for n, v in _selfmod_base(B, T, H, d, g).items()}
        valid = torch.rand(B, T, generator=g).to(dev) > 0.05
        return x, valid

    def make(dev, dtype):
        x, valid = leaves(dev, dtype)

        def run(backend):
            y, P = ops.selfmod_projection(**x, valid=valid, chunk_size=chunk, backend=backend)
            return _grads([y, P], list(x.values()), backward)
        return run

    def make_loop(dev, dtype):
        from nested_learning.checks import range_checks_off
        from nested_learning.reference.selfmod import selfmod_projection_reference

        x, valid = leaves(dev, dtype)

        def run():
            with range_checks_off():  # as the layer ran it
                y, P = selfmod_projection_reference(*x.values(), valid, chunk, 0.3, True, True, dgd=ops.dgd_update)
            return _grads([y, P], list(x.values()), backward)
        return run
    return Case("selfmod_projection", dict(B=B, T=T, H=H, d=d, chunk=chunk), B * T, backward, make,
                peers={"the layer's per-chunk loop (before the op)": (lambda: True, make_loop)})


def cms_case(B, T, d_in, d_out, period, optimizer="dgd"):
    """deep_momentum has no registered backend: its rows are the reference and the factored
    form (ops.cms.deep_momentum_factored, what backend=None runs)."""
    deep = optimizer == "deep_momentum"

    def make(dev, dtype):
        g = torch.Generator().manual_seed(0)
        W = (torch.randn(d_out, d_in, generator=g) / d_in**0.5).to(dev, dtype)
        xs = torch.randn(B, T, d_in, generator=g).to(dev, dtype)
        ds = (1e-2 * torch.randn(B, T, d_out, generator=g)).to(dev, dtype)
        state = ops.CMSState.create(W, period, batch_size=B, optimizer=optimizer)

        def run(backend):
            chosen = None if deep and backend == "factored" else backend
            st, up = ops.cms_update(state, xs, ds, lr=1e-3, optimizer=optimizer, backend=chosen)
            return [st.weight, up.update_norms] + ([st.momentum, *st.deep] if deep else [])
        return run
    return Case("cms_update", dict(B=B, T=T, d_in=d_in, d_out=d_out, period=period, opt=optimizer),
                B * T, False, make, backends=("reference", "factored") if deep else None)


def ce_case(N, D, V, backward=True):
    def make(dev, dtype):
        g = torch.Generator().manual_seed(0)
        h = _leaf(torch.randn(N, D, generator=g).to(dev), dtype, backward)
        W = _leaf((torch.randn(V, D, generator=g) / D**0.5).to(dev), dtype, backward)
        y = torch.randint(0, V, (N,), generator=g).to(dev)

        def run(backend):
            loss, delta = ops.linear_cross_entropy(h, W, y, backend=backend)
            return _grads([loss, delta], [h, W], backward)
        return run
    return Case("linear_cross_entropy", dict(tokens=N, D=D, V=V), N, backward, make)


def cases(quick: bool, device: str) -> list[Case]:
    if quick:
        return [
            dgd_case(1, 256, 2, 32),
            selfmod_case(1, 256, 2, 32),
            titan_case(1, 256, 2, 32),
            titan_mlp_case(1, 128, 2, 32, 64),
            cms_case(2, 256, 64, 128, 16),
            cms_case(2, 64, 32, 64, 1, "deep_momentum"),
            ce_case(512, 64, 2048),
        ]
    if device == "cuda":
        return [
            dgd_case(8, 4096, 16, 64),
            dgd_stream_case(8, 128, 16, 64),
            selfmod_case(8, 4096, 16, 64),
            titan_case(8, 4096, 16, 64),
            titan_mlp_case(4, 2048, 8, 64, 256),
            cms_case(8, 4096, 1024, 4096, 16),
            cms_case(8, 256, 512, 2048, 1, "deep_momentum"),
            ce_case(8192, 512, 32768),
        ]
    return [
        dgd_case(2, 2048, 4, 64),
        dgd_stream_case(2, 64, 4, 64),
        selfmod_case(4, 2048, 4, 32),
        titan_case(2, 2048, 4, 64),
        titan_mlp_case(2, 1024, 4, 64, 128),
        cms_case(4, 1024, 256, 1024, 16),
        cms_case(8, 128, 128, 256, 1, "deep_momentum"),  # HOPE smoke's period-1 level, one training segment
        ce_case(2048, 512, 32768),
    ]


@dataclass
class StepCase:
    """One two-pass training step of a model: forward, backward (outer gradients and teach
    signals), CMS update pass, optimizer step."""

    model: str
    size: str
    batch: int
    seq: int
    updates: bool = True  # False: the same step without teach capture and CMS update pass
    overrides: dict = field(default_factory=dict)  # the model config's fields changed (cms_optimizer=...)

    @property
    def op(self) -> str:
        return f"step:{self.model}" + ("" if self.updates else "-noupdates")

    @property
    def shape_str(self) -> str:
        return f"size={self.size} B={self.batch} T={self.seq}"

    def make(self, dev: torch.device):
        from nested_learning.models import build_model

        torch.manual_seed(0)
        m = build_model(self.model, self.size, **self.overrides).to(dev)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        tok = torch.randint(0, m.config.vocab_size, (self.batch, self.seq), device=dev)

        def step():
            if self.updates:
                loss, cap, st = m.train_forward(tok)
            else:
                loss, st = m(tok, targets=m.next_token_targets(tok))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if self.updates:
                m.apply_updates(st, cap)
            return loss
        return m, step


def step_cases(quick: bool, device: str) -> list[StepCase]:
    if quick:
        return [StepCase(n, "tiny", 2, 64) for n in ("transformer", "titans", "hope")]
    B, T = (16, 1024) if device == "cuda" else (4, 256)
    # HOPE twice: with its in-context updates (teach capture + CMS update pass) and without
    return ([StepCase(n, "smoke", B, T) for n in ("transformer", "titans", "hope")]
            + [StepCase("hope", "smoke", B, T, updates=False)])


@dataclass
class DecodeCase:
    """Token-by-token generation beside the model's own forward over the same tokens in one
    call: the cost of decoding one token at a time. `ragged`: a batch of prompts of lengths
    1, 2, ..., batch through model.generate_batch (each row its own prompt, decoded together);
    else model.generate from one-token prompts."""

    model: str
    size: str
    batch: int
    new_tokens: int
    ragged: bool = False

    @property
    def op(self) -> str:
        return f"decode:{self.model}"

    @property
    def shape_str(self) -> str:
        return f"size={self.size} B={self.batch}{' ragged' if self.ragged else ''} new={self.new_tokens}"

    def make(self, dev: torch.device):
        from nested_learning.models import build_model

        torch.manual_seed(0)
        m = build_model(self.model, self.size).to(dev).eval()
        seq = torch.randint(0, m.config.vocab_size, (self.batch, self.new_tokens + 1), device=dev)
        prompts = [seq[b, :b + 1] for b in range(self.batch)]

        def decode():
            if self.ragged:
                return m.generate_batch(prompts, self.new_tokens)
            return m.generate(seq[:, :1], self.new_tokens)[0]

        def forward():  # the same B x (1 + new_tokens) tokens through the model at once
            with torch.no_grad():
                return m(seq)[0]

        def stream():  # the same tokens one at a time through forward (generate's path before the decode step)
            from nested_learning.checks import range_checks_off

            with torch.no_grad(), range_checks_off():
                h, st = m.hidden(seq[:, :1])
                for i in range(1, seq.shape[1]):
                    h, st = m.hidden(seq[:, i:i + 1], st)
            return h
        return m, decode, forward, (None if self.ragged else stream)

    def bytes_per_token(self, model) -> int:
        """Bytes a batch-B decode step must read at least: every weight once (the tied embedding
        as the head's matrix), except that each row reads its own fast memories (the CMS levels'
        fast weights, the projection and main memories, the Titans memory) in place of the slow
        weights they started from, and its KV caches at their longest (after the generation).
        Buffers a step does not read (momenta, the CMS levels' pending inputs) are left out."""
        p = model.embed.weight
        elements = model.num_parameters()
        for blk, st in zip(model.blocks, model.init_state(self.batch).layers):
            for key, sub in st.items():
                mod = getattr(blk, key, None)
                for fast, slow in (mod.fast_memories(sub).values() if hasattr(mod, "fast_memories") else ()):
                    elements += fast.numel() - slow.numel()
        elements += sum(m.h * m.d * 2 * (self.new_tokens + 1) * self.batch for m in model._attention())
        return elements * p.element_size()



def decode_cases(quick: bool) -> list[DecodeCase]:
    names = ("transformer", "titans", "hope")
    if quick:
        return [DecodeCase(n, "tiny", 2, 16) for n in names] + [DecodeCase(n, "tiny", 4, 8, ragged=True) for n in names]
    return ([DecodeCase(n, "smoke", 1, 128) for n in names] + [DecodeCase(n, "smoke", 16, 64) for n in names]
            + [DecodeCase(n, "smoke", 16, 64, ragged=True) for n in names])
