"""Benchmark every op, each available backend beside the reference.

    python bench/run.py                 # CPU, full shapes, within --time-limit (15 minutes)
    python bench/run.py --quick         # small shapes, a few seconds per op
    python bench/run.py --device cuda --dtype bfloat16 --json bench/out/cuda.json

Prints one row per (op, backend): shape, median ms, tokens/s, speedup over the reference
backend and the relative error (||x - ref|| / ||ref||, worst over outputs and input
gradients) against the float64 reference on the same inputs. --json writes the rows with the
device, versions and build information, rewritten after every row (a killed run keeps its
rows). --time-limit (default 900 s) bounds the run: the op rows stop at two thirds of it so that
the training-step and decode rows run; each row left out is printed and recorded as skipped for
the time limit. Each case's tensors are freed before the next one.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time

import torch

import nested_learning
from nested_learning import ops
from nested_learning.models.flops import count_flops
from nested_learning.train.mfu import gemm_peak

if __package__:  # imported as bench.run (the tests; python -m bench.run)
    from .cases import cases, decode_cases, step_cases
else:  # python bench/run.py: bench/ is sys.path[0]
    from cases import cases, decode_cases, step_cases

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def read_ms(nbytes: int, dev: torch.device) -> float:
    """Median ms to read `nbytes` of float32 once (a sum over a buffer of that size, warm): the
    floor of a step that must read that many bytes, at this machine's rate for that working set."""
    x = torch.rand(max(1, nbytes // 4), device=dev)
    return median_ms(x.sum, dev, warmup=1, repeat=21)


def median_ms(fn, device: torch.device, warmup: int, repeat: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def rel_err(got: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    worst = 0.0
    for g, r in zip(got, ref):
        g, r = g.double().cpu(), r.double().cpu()
        if not torch.isfinite(g).all():
            return float("inf")
        den = r.norm().item()
        worst = max(worst, (g - r).norm().item() / (den if den > 0 else 1.0))
    return worst


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "nested_learning": nested_learning.__version__, "build": nested_learning.build_info()}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
    return out


def _report(rows: list, row: dict, case, name: str) -> None:
    rows.append(row)
    mode = case.mode or ("fwd+bwd" if case.backward else "fwd")
    row["mode"] = mode
    sp = f"{row['speedup_vs_reference']:.2f}x" if row["speedup_vs_reference"] else "-"
    print(f"{case.op:22} {name:10} {case.shape_str + ' ' + mode:46} {row['median_ms']:10.2f} "
          f"{row['tokens_per_s']:12.0f} {sp:>8} {row['rel_err_vs_fp64_reference']:9.1e}", flush=True)


def _skip_reason(exc: BaseException) -> str:
    msg = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {msg[:200]}" if msg else type(exc).__name__


def _run_peer(rows: list, case, peer: str, available, make_peer, dev, dtype, repeat, ref_ms, ref_out) -> None:
    """Time one peer package on the case's shapes, or record why it was not timed.

    A peer that is not installed, or that fails when it is built or run here (flash-linear-
    attention's Triton kernels on CPU tensors: "0 active drivers"), becomes a row with
    "skipped" set to the reason, and the table says so: a benchmark of our ops is not lost
    because a peer cannot run on this device. Only peers are run this way; a failure of one
    of our own backends still stops the run.
    """
    reason = None
    if not available():
        reason = "not installed (pip install -e '.[peers]')"
    else:
        try:
            prun = make_peer(dev, dtype)
            out = prun()
            ms = median_ms(prun, dev, warmup=1, repeat=repeat)
        except Exception as exc:  # noqa: BLE001 - any failure of a peer: report it, go on
            reason = f"fails on {dev.type}: {_skip_reason(exc)}"
    if reason is not None:
        mode = case.mode or ("fwd+bwd" if case.backward else "fwd")
        rows.append({"op": case.op, "backend": peer, "shape": case.shape, "backward": case.backward,
                     "mode": mode, "median_ms": None, "tokens_per_s": None, "speedup_vs_reference": None,
                     "rel_err_vs_fp64_reference": None, "peer": True, "skipped": reason})
        print(f"{case.op:22} {peer:10} {case.shape_str + ' ' + mode:46} skipped: {reason}", flush=True)
        return
    row = {"op": case.op, "backend": peer, "shape": case.shape, "backward": case.backward,
           "median_ms": ms, "tokens_per_s": case.tokens / (ms / 1e3),
           "speedup_vs_reference": (ref_ms / ms) if ref_ms else None,
           "rel_err_vs_fp64_reference": rel_err(out, ref_out[:len(out)]), "peer": True}
    _report(rows, row, case, peer)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES))
    ap.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    ap.add_argument("--ops", nargs="*", default=None, help=f"subset of {ops.OPS}, 'step' (model training steps) and 'decode' (token-by-token generation)")
    ap.add_argument("--backends", nargs="*", default=None, help="subset of backends to time")
    ap.add_argument("--repeat", type=int, default=None, help="timed repeats (median reported)")
    ap.add_argument("--json", default=None, metavar="PATH", help="write results as JSON (after every row)")
    ap.add_argument("--time-limit", type=float, default=900.0, metavar="SECONDS",
                    help="bound on the run (default 900): op rows stop at 2/3 of it, then steps and decode")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible")
    unknown = set(args.ops or ()) - set(ops.OPS) - {"step", "decode"}
    if unknown:
        ap.error(f"unknown ops {sorted(unknown)}; choose from {ops.OPS}, 'step', 'decode'")
    dev = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    repeat = args.repeat or (3 if args.quick else 5)
    meta = {"device": device_name(dev), "device_type": dev.type, "dtype": args.dtype,
            "threads": torch.get_num_threads(), "quick": args.quick, "command": " ".join(sys.argv),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **versions()}
    print(f"# {meta['device']} | torch {meta['torch']} | triton {meta['triton']} | "
          f"{meta['threads']} threads | {args.dtype} | median of {repeat}", flush=True)
    header = f"{'op':22} {'backend':10} {'shape':46} {'ms':>10} {'tokens/s':>12} {'speedup':>8} {'rel err':>9}"
    print(header)
    print("-" * len(header), flush=True)
    rows, t0 = [], time.perf_counter()
    op_cases = [c for c in cases(args.quick, args.device) if not args.ops or c.op in args.ops]

    def left_out(op: str, shape: str, section: str) -> bool:
        """True (and the row recorded as skipped) once the section's share of --time-limit is spent."""
        share = {"ops": 2 / 3, "rest": 1.0}[section]
        if time.perf_counter() - t0 < share * args.time_limit:
            return False
        rows.append({"op": op, "shape": shape, "skipped": f"--time-limit {args.time_limit:g} s reached", "time_limit": True})
        print(f"{op:22} {'-':10} {str(shape):46} skipped: --time-limit {args.time_limit:g} s reached", flush=True)
        return True

    def save() -> None:
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            tmp = args.json + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"meta": {**meta, "seconds": round(time.perf_counter() - t0, 1)}, "rows": rows}, f, indent=2)
            os.replace(tmp, args.json)

    for i, case in enumerate(op_cases):
        print(f"# [{i + 1}/{len(op_cases)}] {case.op} {case.shape}", flush=True)
        if left_out(case.op, case.shape, "ops"):
            continue
        ref_out = case.make(dev, torch.float64)("reference")
        run = case.make(dev, dtype)
        ref_ms = None
        # Triton on CPU tensors is its interpreter: a correctness tool, timed only when asked for
        backends = [b for b in (case.backends or reversed(ops.available_backends(case.op, dev.type)))
                    if (b in args.backends if args.backends is not None
                        else not (b == "triton" and dev.type == "cpu"))]
        for backend in backends:  # reference first: the others report a speedup over it
            out = run(backend)
            ran = backend if case.backends else ops.last_backend(case.op)
            ms = median_ms(lambda: run(backend), dev, warmup=1, repeat=repeat)
            if backend == "reference":
                ref_ms = ms
            row = {"op": case.op, "backend": ran, "shape": case.shape, "backward": case.backward,
                   "median_ms": ms, "tokens_per_s": case.tokens / (ms / 1e3),
                   "speedup_vs_reference": (ref_ms / ms) if ref_ms else None,
                   "rel_err_vs_fp64_reference": rel_err(out, ref_out)}
            _report(rows, row, case, ran)
        for peer, (available, make_peer) in case.peers.items():
            _run_peer(rows, case, peer, available, make_peer, dev, dtype, repeat, ref_ms, ref_out)
        ref_out = run = out = None  # this case's tensors go before the next case's are made
        gc.collect()
        save()
    if args.ops is None or any(o.startswith("step") for o in args.ops):
        peak = None  # the GEMM peak, measured once in this run, before the first step row
        for sc in step_cases(args.quick, args.device):
            if left_out(sc.op, sc.shape_str, "rest"):
                continue
            if peak is None:
                peak = gemm_peak(dev, dtype)
                print(f"# GEMM peak: {peak / 1e9:.1f} GFLOP/s ({dtype}, a 1024^2 product on CPU, 8192^2 on GPU)")
            model, step = sc.make(dev)
            ms = median_ms(step, dev, warmup=1, repeat=repeat)
            tps = sc.batch * sc.seq / (ms / 1e3)
            fpt = count_flops(model, sc.seq, training=sc.updates).training()  # without updates: no CMS update pass
            row = {"op": sc.op, "backend": "auto", "shape": sc.shape_str, "backward": True, "median_ms": ms,
                   "tokens_per_s": tps, "parameters": model.num_parameters(),
                   "flops_per_token": fpt, "flops_per_s": tps * fpt, "gemm_peak_flops": peak, "mfu": tps * fpt / peak,
                   "speedup_vs_reference": None, "rel_err_vs_fp64_reference": None}
            rows.append(row)
            print(f"{sc.op:22} {'auto':10} {sc.shape_str + ' train step':46} {ms:10.2f} "
                  f"{row['tokens_per_s']:12.0f} {'-':>8} {'-':>9}  ({row['parameters']:,} params; "
                  f"{fpt / 1e6:.1f} MFLOP per token, {tps * fpt / 1e9:.1f} GFLOP/s, MFU {row['mfu']:.1%})", flush=True)
            model = step = None
            save()
    if args.ops is None or any(o.startswith("decode") for o in args.ops):
        for dc in decode_cases(args.quick):
            if left_out(dc.op, dc.shape_str, "rest"):
                continue
            model, decode, forward, stream = dc.make(dev)
            # interleaved rounds: generate (the decode step), the same tokens one at a time through
            # forward (generate's path before the decode step), the forward over all of them at once
            fns = {"decode": decode, "forward": forward, **({"stream": stream} if stream else {})}
            got = {k: [] for k in fns}
            for r in range(max(1, repeat // 2)):
                for k, fn in fns.items():
                    got[k].append(median_ms(fn, dev, warmup=int(r == 0), repeat=2))
            ms, fwd_ms = (statistics.median(got[k]) for k in ("decode", "forward"))
            stream_ms = statistics.median(got["stream"]) if stream else None
            nbytes = dc.bytes_per_token(model)
            floor = read_ms(nbytes, dev)
            per_tok, fwd_tok = ms / dc.new_tokens, fwd_ms / (dc.new_tokens + 1)
            row = {"op": dc.op, "backend": "auto", "shape": dc.shape_str, "backward": False, "median_ms": ms,
                   "tokens_per_s": dc.batch * dc.new_tokens / (ms / 1e3), "forward_same_tokens_ms": fwd_ms,
                   "forward_tokens_per_s": dc.batch * (dc.new_tokens + 1) / (fwd_ms / 1e3),
                   "decode_vs_forward": ms / fwd_ms, "ms_per_step": per_tok,
                   "step_vs_forward_per_token": per_tok / fwd_tok, "stream_ms": stream_ms,
                   "stream_ms_per_step": None if stream_ms is None else stream_ms / (dc.new_tokens + 1),
                   "bytes_per_step": nbytes, "read_floor_ms": floor, "step_vs_floor": per_tok / floor,
                   "parameters": model.num_parameters(),
                   "speedup_vs_reference": None, "rel_err_vs_fp64_reference": None}
            rows.append(row)
            was = "" if stream_ms is None else f"; one token at a time through forward {stream_ms / (dc.new_tokens + 1):.2f} ms"
            print(f"{dc.op:22} {'auto':10} {dc.shape_str + ' generate':46} {ms:10.2f} {row['tokens_per_s']:12.0f} "
                  f"{'-':>8} {'-':>9}  ({per_tok:.2f} ms a step{was}; {per_tok / fwd_tok:.1f}x the forward per token; "
                  f"{per_tok / floor:.1f}x the floor of reading {nbytes / 2**20:.1f} MiB, {floor:.2f} ms)", flush=True)
            model = decode = forward = stream = None
            save()
    save()
    skipped = sum(bool(r.get("time_limit")) for r in rows)
    print(f"# {time.perf_counter() - t0:.0f} s" + (f"; {skipped} rows skipped for --time-limit" if skipped else ""))
    if args.json:
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
