"""Does preparing, streaming and training on a corpus take memory that grows with the corpus?
(It should not.)

    python bench/prepare_memory.py                                   # 1x, 10x, 100x of 1M tokens
    python bench/prepare_memory.py --ref-tokens 200000 --scales 1,10 --json bench/out/prepare_memory.json
    python bench/prepare_memory.py --json bench/out/prepare_memory.json --train-steps 200

Builds synthetic corpora of 1x, 10x and 100x a reference size from the built-in Shakespeare
corpus (nested_learning.data.sources.fetch_shakespeare: the plays cut at blank lines into pieces of
2-20k characters, each repetition shuffled anew) as .jsonl files of 10,000 documents in a
temporary directory, then for each:

- prepare: `scripts/prepare_data.py data=local data.path=DIR` in a subprocess (default data
  config: vocab 4096, tokenizer_sample 100M characters, every core), run in a child that reports
  its own peak RSS (the main process: reading, batching, writing) and that of its largest
  encoding worker (getrusage of its children), while this process samples the proportional set
  size (PSS: shared pages counted once) of the whole process tree (main + workers) every 0.1 s;
- stream: a child that loads the prepared corpus (memory-mapped) and runs --steps steps of
  DocumentStreams (batch 8, seq_len 512), reporting its peak RSS, and at the end its anonymous
  and file-backed resident memory (the shard pages it touched are file-backed: clean page cache,
  reclaimable);
- train: `python train.py data=local data.path=DIR data.data_dir=<the prepare step's> train.steps=N
  train.eval_every=N train.save_every=N train.progress=false train.out_dir=<temporary>` (the smoke
  HOPE model, default config; N = --train-steps at every scale, so only the corpus size changes;
  0 skips it) under a child that reports train.py's peak RSS (getrusage of its children; train.py
  is its only one), a 0.1 s sample of train.py's anonymous RSS (its peak) and the file-backed RSS
  at that moment (mapped shard pages, libraries), the wall time (train_s: the whole process;
  s/step: from its 'model:' line to its exit, the final evaluation and checkpoint included), the
  seconds until its 'data:' line (the corpus opened: seconds, where preparing took the prepare
  step's), and the checks that train.py read the prepared shards (its 'data: local | ... | cache C'
  line names the prepare step's cache, it logged no tokenizing, the cache's files kept their sizes
  and modification times, no other cache appeared) and trained N steps (metrics.jsonl holds one
  record for each of steps 1..N; the run stops with an error after writing the JSON otherwise);
- baseline: each child's RSS after its imports (torch comes with nested_learning), before work.

Prints a table and writes JSON (--json)."""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHARS_PER_TOKEN = 3.05  # Shakespeare with the 4096-token tokenizer (5,057,198 characters, 1,656,725 tokens)
DOCS_PER_FILE = 10_000


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _maxrss_mb(who) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # KiB on Linux


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(c) for c in f.read().split()]
    except (FileNotFoundError, ProcessLookupError):
        return []
    return kids + [g for k in kids for g in _children(k)]


def tree_pss_mb(pid: int) -> float:
    """Proportional set size of pid and its descendants (MB): pages shared by the forked workers
    (the interpreter, torch) counted once in all, not once per process as RSS counts them."""
    total = 0
    for p in [pid] + _children(pid):
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += next(int(ln.split()[1]) for ln in f if ln.startswith("Pss:"))
        except (FileNotFoundError, ProcessLookupError, PermissionError, StopIteration):
            pass
    return total / 1024


# ---------------------------------------------------------------------------- corpora
def pieces(data_dir: str, seed: int = 0) -> list[str]:
    """The Shakespeare texts cut at blank lines into pieces of 2k-20k characters."""
    from nested_learning.data.sources import fetch_shakespeare

    rng = random.Random(seed)
    out = []
    for _, text in sorted(fetch_shakespeare(data_dir)):
        paras = re.split(r"\n\s*\n", text)
        cur, want = [], rng.randint(2000, 20000)
        for p in paras:
            cur.append(p)
            if sum(len(x) for x in cur) >= want:
                out.append("\n\n".join(cur))
                cur, want = [], rng.randint(2000, 20000)
        if cur:
            out.append("\n\n".join(cur))
    return out


def build_corpus(dest: str, pool: list[str], chars: int, seed: int) -> dict:
    """.jsonl files of shuffled pieces totalling about `chars` characters."""
    os.makedirs(dest, exist_ok=True)
    n_docs = n_chars = n_files = rep = 0
    f = None
    while n_chars < chars:
        order = list(range(len(pool)))
        random.Random(seed * 1000 + rep).shuffle(order)
        rep += 1
        for i in order:
            if n_chars >= chars:
                break
            if f is None or n_docs % DOCS_PER_FILE == 0:
                if f is not None:
                    f.close()
                f = open(os.path.join(dest, f"part-{n_files:05d}.jsonl"), "w")
                n_files += 1
            text = pool[i]
            f.write(json.dumps({"text": text}) + "\n")
            n_docs += 1
            n_chars += len(text)
    if f is not None:
        f.close()
    return {"docs": n_docs, "chars": n_chars, "files": n_files,
            "bytes": sum(os.path.getsize(os.path.join(dest, x)) for x in os.listdir(dest))}


# ---------------------------------------------------------------------------- children
def child_prepare(args) -> None:
    sys.argv = ["prepare_data.py"]
    spec_path = os.path.join(ROOT, "scripts", "prepare_data.py")
    import importlib.util

    spec = importlib.util.spec_from_file_location("prepare_data", spec_path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    import nested_learning.data.shards  # noqa: F401  (the imports, counted in the baseline)

    base = _status_kb("VmRSS") / 1024
    t0 = time.perf_counter()
    index = script.main(args.overrides + ["--no-progress"])
    print("RESULT " + json.dumps({
        "baseline_rss_mb": base, "main_peak_rss_mb": _maxrss_mb(resource.RUSAGE_SELF),
        "worker_peak_rss_mb": _maxrss_mb(resource.RUSAGE_CHILDREN), "seconds": time.perf_counter() - t0,
        "cache": index["cache"], "n_docs": index["n_docs"], "n_tokens": index["n_tokens"],
        "train_tokens": index["splits"]["train"]["n_tokens"], "shards": sum(len(index["splits"][s]["shards"])
                                                                         for s in ("train", "val")),
        "tokenizer": index["tokenizer"]}), flush=True)


def child_stream(args) -> None:
    from nested_learning.data.shards import load_corpus
    from nested_learning.data.streams import DocumentStreams
    from nested_learning.data.tokens import SPECIALS

    base = _status_kb("VmRSS") / 1024
    tok, train, _ = load_corpus(args.cache)
    streams = DocumentStreams(train, args.batch, args.seq_len, seed=0, pad_id=tok.token_to_id(SPECIALS[1]))
    t0 = time.perf_counter()
    n = 0
    for _ in range(args.steps):
        x, _, _ = streams.next()
        n += int((x != streams.pad).sum())
    dt = time.perf_counter() - t0
    print("RESULT " + json.dumps({
        "baseline_rss_mb": base, "peak_rss_mb": _status_kb("VmHWM") / 1024,
        "end_rss_anon_mb": _status_kb("RssAnon") / 1024, "end_rss_file_mb": _status_kb("RssFile") / 1024,
        "steps": args.steps, "tokens_read": n, "ms_per_step": dt / args.steps * 1e3, "n_docs": len(train),
        "epochs": max(streams.pos["epoch"])}), flush=True)


def _snapshot(d: str) -> dict[str, list[int]]:
    """[size, mtime_ns] of every file under d (by relative path)."""
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            path = os.path.join(root, f)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            out[os.path.relpath(path, d)] = [st.st_size, st.st_mtime_ns]
    return out


def _proc_status_kb(pid: int) -> dict[str, int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            return {ln.split(":")[0]: int(ln.split()[1]) for ln in f
                    if ln.startswith(("VmRSS:", "RssAnon:", "RssFile:", "RssShmem:"))}
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return {}


def child_train(args) -> None:
    """train.py as this process's only child: its peak RSS from getrusage(RUSAGE_CHILDREN)."""
    cache_root = os.path.dirname(args.cache)
    caches_before = sorted(os.listdir(cache_root))
    files_before = _snapshot(args.cache)
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *args.overrides]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    peak = {"anon_kb": 0, "file_kb_at_anon_peak": 0, "rss_kb": 0}

    def sample():
        while p.poll() is None:
            st = _proc_status_kb(p.pid)
            if st.get("RssAnon", 0) > peak["anon_kb"]:
                peak["anon_kb"], peak["file_kb_at_anon_peak"] = st["RssAnon"], st.get("RssFile", 0)
            peak["rss_kb"] = max(peak["rss_kb"], st.get("VmRSS", 0))
            time.sleep(0.1)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    lines, data_line, data_line_s, model_line_s = [], None, None, None
    for ln in p.stdout:
        lines.append(ln.rstrip("\n"))
        if data_line is None and ln.startswith("data: local |"):
            data_line, data_line_s = ln.strip(), time.perf_counter() - t0
        if model_line_s is None and ln.startswith("model: "):
            model_line_s = time.perf_counter() - t0
    p.wait()
    seconds = time.perf_counter() - t0
    th.join()
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n" + "\n".join(lines[-60:]))
    out_dir = next(o.split("=", 1)[1] for o in args.overrides if o.startswith("train.out_dir="))
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        steps = [json.loads(ln)["step"] for ln in f if ln.strip()]
    files_after = _snapshot(args.cache)
    tokenizing = [ln for ln in lines if ln.startswith(("data: tokenizing", "data: training a", "data: resuming",
                                                       "data: prepared", "data: tokenizer trained"))]
    checks = {
        "data_line": data_line is not None,
        "same_cache": data_line is not None and data_line.endswith(f"cache {args.cache}"),
        "no_tokenizing": not tokenizing,
        "cache_files_unchanged": files_before == files_after,
        "no_new_cache": sorted(os.listdir(cache_root)) == caches_before,
        "steps": steps == list(range(1, args.train_steps + 1)),
    }
    print("RESULT " + json.dumps({
        "peak_rss_mb": _maxrss_mb(resource.RUSAGE_CHILDREN), "sampled_peak_rss_mb": peak["rss_kb"] / 1024,
        "sampled_peak_anon_mb": peak["anon_kb"] / 1024, "file_mb_at_anon_peak": peak["file_kb_at_anon_peak"] / 1024,
        "seconds": seconds, "data_line_s": data_line_s, "data_line": data_line,
        "metrics_records": len(steps), "last_step": steps[-1] if steps else None,
        "model_line_s": model_line_s,
        "s_per_step": (seconds - (model_line_s or 0.0)) / max(len(steps), 1), "cache_files": len(files_after),
        "tokenizing_lines": tokenizing, "checks": checks, "ok": all(checks.values()),
        "model_line": next((ln for ln in lines if ln.startswith("model: ")), None),
        "log_tail": lines[-6:]}), flush=True)


def run_child(cmd: list[str], env: dict) -> dict:
    """Runs a child, sampling its process tree's RSS; returns its RESULT plus tree_peak_pss_mb."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    peak = [0.0]

    def sample():
        while p.poll() is None:
            peak[0] = max(peak[0], tree_pss_mb(p.pid))
            time.sleep(0.1)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, _ = p.communicate()
    th.join()
    res = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not res:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{out[-3000:]}")
    return {**json.loads(res[-1][len("RESULT "):]), "tree_peak_pss_mb": peak[0], "wall_s": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref-tokens", type=int, default=1_000_000, help="tokens of the 1x corpus (about)")
    ap.add_argument("--scales", default="1,10,100")
    ap.add_argument("--steps", type=int, default=5000, help="DocumentStreams steps per corpus")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--train-steps", type=int, default=200,
                    help="train.py steps per corpus (the same at every scale; 0: no training)")
    ap.add_argument("--workdir", default=None, help="where corpora and shards go (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the corpora and shards")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", choices=["prepare", "stream", "train"], help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="extra data.* overrides for prepare_data.py (and train.py)")
    args = ap.parse_args()
    if args.child == "prepare":
        return child_prepare(args)
    if args.child == "stream":
        return child_stream(args)
    if args.child == "train":
        return child_train(args)

    from nested_learning.data.sources import data_dir_of

    scales = [int(s) for s in args.scales.split(",")]
    work = args.workdir or tempfile.mkdtemp(prefix="prepare_memory-")
    os.makedirs(work, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    pool = pieces(data_dir_of({}))
    rows = []
    try:
        for k in scales:
            src = os.path.join(work, f"corpus-{k}x")
            shutil.rmtree(src, ignore_errors=True)
            corpus = build_corpus(src, pool, int(args.ref_tokens * k * CHARS_PER_TOKEN), seed=k)
            print(f"{k}x: {corpus['docs']:,} documents, {corpus['chars']:,} characters in {corpus['files']} "
                  f"files ({corpus['bytes'] / 2**20:.0f} MiB)", flush=True)
            overrides = ["data=local", f"data.path={src}", f"data.data_dir={os.path.join(work, 'data')}",
                         *args.overrides]
            prep = run_child([sys.executable, os.path.abspath(__file__), "--child", "prepare", *overrides], env)
            print(f"  prepare: {prep['n_tokens']:,} tokens in {prep['wall_s']:.0f} s, main peak "
                  f"{prep['main_peak_rss_mb']:.0f} MB, largest worker {prep['worker_peak_rss_mb']:.0f} MB, "
                  f"tree (PSS) {prep['tree_peak_pss_mb']:.0f} MB", flush=True)
            stream = run_child([sys.executable, os.path.abspath(__file__), "--child", "stream", "--cache",
                                prep["cache"], "--steps", str(args.steps), "--batch", str(args.batch),
                                "--seq-len", str(args.seq_len)], env)
            print(f"  stream: {stream['steps']} steps, peak {stream['peak_rss_mb']:.0f} MB "
                  f"(anon {stream['end_rss_anon_mb']:.0f} MB, file {stream['end_rss_file_mb']:.0f} MB), "
                  f"{stream['ms_per_step']:.3f} ms/step", flush=True)
            train = None
            if args.train_steps:
                n = str(args.train_steps)
                train = run_child([sys.executable, os.path.abspath(__file__), "--child", "train", "--cache",
                                   prep["cache"], "--train-steps", n, "--", *overrides, f"train.steps={n}",
                                   f"train.out_dir={os.path.join(work, f'train-{k}x')}", f"train.eval_every={n}",
                                   f"train.save_every={n}", "train.progress=false"], env)
                print(f"  train: {train['last_step']} steps in {train['seconds']:.0f} s "
                      f"({train['s_per_step']:.2f} s/step; 'data:' line after {train['data_line_s']:.1f} s), "
                      f"peak {train['peak_rss_mb']:.0f} MB (sampled anon {train['sampled_peak_anon_mb']:.0f} MB), "
                      f"tree (PSS) {train['tree_peak_pss_mb']:.0f} MB; checks {train['checks']}", flush=True)
            rows.append({"scale": k, "corpus": corpus, "prepare": prep, "stream": stream, "train": train})
            if not args.keep:
                shutil.rmtree(src, ignore_errors=True)
                shutil.rmtree(prep["cache"], ignore_errors=True)
                shutil.rmtree(os.path.join(work, f"train-{k}x"), ignore_errors=True)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print("| corpus | documents | tokens | prepare s | tokens/s | prepare baseline MB | main peak MB | "
          "worker peak MB | tree PSS peak MB | stream peak MB | stream anon MB | ms/step | "
          "train steps | train_peak_mb | train anon peak MB | train_s | train s/step after build | train 'data:' s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        p, s, t = r["prepare"], r["stream"], r["train"]
        tr = ("| - | - | - | - | - | - |" if t is None else
              f"| {t['last_step']} | {t['peak_rss_mb']:.0f} | {t['sampled_peak_anon_mb']:.0f} | {t['seconds']:.0f} | "
              f"{t['s_per_step']:.2f} | {t['data_line_s']:.1f} |")
        print(f"| {r['scale']}x | {p['n_docs']:,} | {p['n_tokens']:,} | {p['wall_s']:.0f} | "
              f"{p['n_tokens'] / p['seconds']:,.0f} | {p['baseline_rss_mb']:.0f} | {p['main_peak_rss_mb']:.0f} | "
              f"{p['worker_peak_rss_mb']:.0f} | {p['tree_peak_pss_mb']:.0f} | {s['peak_rss_mb']:.0f} | "
              f"{s['end_rss_anon_mb']:.0f} | {s['ms_per_step']:.3f} " + tr)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"ref_tokens": args.ref_tokens, "steps": args.steps, "batch": args.batch,
                       "seq_len": args.seq_len, "train_steps": args.train_steps,
                       "train_overrides": ["data=local", "data.path=DIR", "data.data_dir=<the prepare step's>",
                                           "train.steps=N", "train.out_dir=<temporary>", "train.eval_every=N",
                                           "train.save_every=N", "train.progress=false"],
                       "cores": len(os.sched_getaffinity(0)), "rows": rows}, f, indent=1)
    failed = [r["scale"] for r in rows if r["train"] is not None and not r["train"]["ok"]]
    if failed:
        sys.exit(f"train checks failed at scale(s) {failed}: " +
                 "; ".join(str(r["train"]["checks"]) for r in rows if r["scale"] in failed))


if __name__ == "__main__":
    main()
