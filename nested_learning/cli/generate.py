"""Complete a prompt (or several, decoded together) with a trained run.

    python scripts/generate.py --run runs/hope-smoke --prompt "ROMEO:" --max-new-tokens 100
    python scripts/generate.py --run RUN --prompt-file long.txt --temperature 0.8 --top-k 50 --top-p 0.9 --seed 1
    python scripts/generate.py --run RUN --prompt "ROMEO:" --prompt "JULIET: O Romeo" --stop-at-eot

Greedy (--temperature 0, the default) is deterministic. The prompt streams through the fast
state in segments (any length), then tokens are decoded one by one with the state carried.
Several --prompt are one batch (model.generate_batch): prompts of any lengths, each row
exactly what it would be alone, each stopping at its own end-of-text token."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from nested_learning.cli._common import command
from nested_learning.data.tokens import SPECIALS
from nested_learning.runs import load_run


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a run directory of train.py, or one of its checkpoints")
    ap.add_argument("--step", type=int, default=None)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="repeat for a batch of prompts")
    src.add_argument("--prompt-file")
    ap.add_argument("--max-new-tokens", type=int, default=100)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--top-p", type=float, default=None, help="nucleus sampling: the smallest set of tokens "
                                                               "whose probability reaches this")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--stop-at-eot", action="store_true", help="stop at the end-of-text token")
    a = ap.parse_args(argv)
    model, tok = load_run(a.run, a.step, a.device)
    eot = tok.token_to_id(SPECIALS[0])
    device = model.embed.weight.device
    gen = torch.Generator(device=device).manual_seed(a.seed)
    if a.prompt is not None and len(a.prompt) > 1:
        return _batch(model, tok, a, eot, gen)
    text = a.prompt[0] if a.prompt is not None else open(a.prompt_file, encoding="utf-8").read()
    ids = tok.encode(text).ids or [eot]
    t0 = time.perf_counter()
    out, _ = model.generate(torch.tensor(ids, device=device), a.max_new_tokens, a.temperature, a.top_k,
                            eos=eot if a.stop_at_eot else None, generator=gen, top_p=a.top_p)
    dt = time.perf_counter() - t0
    completion = tok.decode(out[0].tolist())
    print(text + completion)
    print(f"\n[{model.run_info.model} step {model.run_info.step}: {len(ids)} prompt tokens, {out.shape[1]} new tokens "
          f"in {dt:.2f} s]", file=sys.stderr)
    if out.shape[1] and not completion.strip():
        print(f"[all {out.shape[1]} new tokens are white space: greedy decoding of a small or briefly trained model "
              "often repeats its most frequent token (a line break); sample instead, e.g. --temperature 0.8 "
              "--top-k 50]", file=sys.stderr)
    return completion


def _batch(model, tok, a, eot: int, gen) -> list[str]:
    device = model.embed.weight.device
    prompts = [torch.tensor(tok.encode(t).ids or [eot], device=device) for t in a.prompt]
    t0 = time.perf_counter()
    rows = model.generate_batch(prompts, a.max_new_tokens, a.temperature, a.top_k, a.top_p,
                                stop=eot if a.stop_at_eot else None, generator=gen)
    dt = time.perf_counter() - t0
    outs = [tok.decode(r.tolist()) for r in rows]
    for i, (text, completion) in enumerate(zip(a.prompt, outs)):
        print(f"--- prompt {i + 1}\n{text}{completion}")
    n = sum(len(r) for r in rows)
    print(f"\n[{model.run_info.model} step {model.run_info.step}: {len(rows)} prompts, {n} new tokens in {dt:.2f} s]",
          file=sys.stderr)
    return outs


console = command(main)  # the entry point: a user error in one line, no traceback


if __name__ == "__main__":
    console()
