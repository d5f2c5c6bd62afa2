"""The inner rules' stability margins on real activations: for each CMS level of a HOPE model
(at init, on one training batch of the run's corpus), lr * lambda_max(X^T X) of its first
chunk's inputs X, raw (the dgd preconditioner before issue 19) and as unit keys (after). The
preconditioner (I - lr X^T X) expands the weight once this passes 2.

    python studies/inner_curvature.py                    # smoke HOPE, shakespeare, cms_lr 1e-3
    python studies/inner_curvature.py --size tiny --lr 1e-2
"""

from __future__ import annotations

import argparse

import torch

from nested_learning.data.shards import prepare_corpus
from nested_learning.data.sources import data_dir_of
from nested_learning.data.streams import DocumentStreams
from nested_learning.data.tokens import SPECIALS
from nested_learning.layers.cms import dgd_inputs, dgd_step
from nested_learning.models import build_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="smoke")
    ap.add_argument("--lr", type=float, default=1e-3, help="model.overrides.cms_lr")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    a = ap.parse_args()
    data = {"source": "shakespeare", "vocab_size": 4096}
    tok, train, _ = prepare_corpus(data, data_dir_of(data), log=lambda *x: None)
    torch.manual_seed(0)
    model = build_model("hope", a.size, vocab_size=tok.get_vocab_size(), cms_optimizer="dgd", cms_lr=a.lr)
    x, y, _ = DocumentStreams(train, a.batch, a.seq_len, 0, tok.token_to_id(SPECIALS[1])).next()
    loss, cap, _ = model.train_forward(x, model.init_state(a.batch), targets=y)
    loss.backward()
    print("| layer | level | period | layer input | mean ‖x‖² | lr·λmax raw | lr'·λmax unit keys |")
    print("|---:|---:|---:|---|---:|---:|---:|")
    for key, inp in sorted(cap.inputs.items(), key=lambda kv: str(kv[0])):
        if key[0] != "cms":
            continue
        _, layer, lvl, which = key
        C = model.config.cms_periods[lvl]
        X = inp.detach().double()[:, :C]
        U, _ = dgd_inputs(X, X, "dgd")
        raw = torch.linalg.eigvalsh(X.transpose(1, 2) @ X).max().item() * a.lr
        unit = torch.linalg.eigvalsh(U.transpose(1, 2) @ U).max().item() * dgd_step(a.lr, C)
        print(f"| {layer} | {lvl} | {C} | {which} | {X.square().sum(-1).mean():.1f} | {raw:.3f} | {unit:.4f} |")


if __name__ == "__main__":
    main()
