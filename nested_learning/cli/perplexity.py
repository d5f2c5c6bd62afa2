"""Long-document perplexity of a trained run: held-out documents of its own corpus (the
validation split) by default, or any local text (--data: a .txt/.jsonl file or a folder).

    python scripts/eval/perplexity.py --run runs/hope-smoke --out results/hope
    python scripts/eval/perplexity.py --run RUN --data my_texts/ --max-docs 20 --out DIR --memorize

Writes DIR/perplexity.json and DIR/perplexity_loss_by_position.png (with --memorize also
DIR/perplexity_memorize.json, and both curves in the plot)."""

from __future__ import annotations

import argparse
import os

from nested_learning.cli._common import command
from nested_learning.data.sources import read_local
from nested_learning.eval import results as R
from nested_learning.eval.perplexity import document_perplexity, plot_loss_by_position
from nested_learning.models.streaming import stream_segment
from nested_learning.runs.load import held_out_documents, load_run


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    R.add_common_args(ap)
    ap.add_argument("--data", default=None, help="local text instead of the run's validation split")
    ap.add_argument("--text-field", default="text", help="the text field of .jsonl files")
    ap.add_argument("--max-docs", type=int, default=None, help="the first N documents")
    ap.add_argument("--max-tokens", type=int, default=None, help="score at most N tokens of each document")
    ap.add_argument("--segment", type=int, default=None,
                    help="tokens per streamed segment (default: memorising, the run's training segment "
                         "train.seq_len; otherwise the model's prefill segment)")
    ap.add_argument("--data-dir", default=None, help="corpus cache (default: as in training)")
    a = ap.parse_args(argv)
    R.memorize_settings(a)
    model, tok = load_run(a.run, a.step, a.device)
    if a.data:
        name, docs = os.path.splitext(os.path.basename(a.data.rstrip("/")))[0], read_local(a.data, a.text_field)
    else:
        name, docs = held_out_documents(model, a.data_dir)
    docs = docs[: a.max_docs]
    total = sum(min(len(tok.encode(t).ids), a.max_tokens or 1 << 62) for _, t in docs)

    def evaluate(setting, reports):
        bar = R.progress_bar(total, f"perplexity{' (memorised)' if setting else ''}", "tok", a.no_progress)
        partial = os.path.join(a.out, f".perplexity{'_memorize' if setting else ''}.partial.pt")  # a kill resumes here
        block = document_perplexity(model, tok, docs, a.segment or stream_segment(model, setting), setting, a.max_tokens, reports, bar, partial,
                                    key={"checkpoint": os.path.abspath(model.run_info.checkpoint),
                                         "step": model.run_info.step, "data": name})
        if bar is not None:
            bar.close()
        return {name: block}

    out = R.baseline_and_memorised("perplexity", model, a, evaluate)
    curves = {("memorised" if "memorize" in label else "baseline"): res["tasks"][name] for label, res in out.items()}
    info = model.run_info
    png = plot_loss_by_position(curves, os.path.join(a.out, "perplexity_loss_by_position.png"),
                                f"{info.model} ({info.size}, step {info.step}) on {name}")
    for label, res in out.items():
        m = res["tasks"][name]["metrics"]
        print(f"{label}: {res['tasks'][name]['n_items']} documents, {res['tasks'][name]['extra']['tokens']} tokens | "
              f"perplexity {m['perplexity']['value']:.3f} | bits/byte {m['bits_per_byte']['value']:.4f} | "
              f"loss {m['loss']['value']:.4f} ± {m['loss']['stderr'] or 0:.4f}")
        for r in res["tasks"][name]["extra"]["loss_by_position"]:
            print(f"    {r['bucket']:>10}: loss {r['loss']:.4f} ({r['tokens']} tokens, {r['documents']} documents)")
    print(f"plot: {png}")
    return out


console = command(main)  # the entry point: a user error in one line, no traceback


if __name__ == "__main__":
    console()
