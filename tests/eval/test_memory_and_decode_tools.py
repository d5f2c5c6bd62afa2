"""The measuring scripts behind bench/RESULTS.md's memory and decode rows run and report
what they say (tiny models; the real rows use the smoke size)."""

import json

import pytest

from bench import eval_memory, probe_compile_decode, profile_decode, selfmod_layer, train_memory


def test_eval_memory_scores_the_same_items_each_round(tiny_runs, tmp_path, capsys):
    task = tmp_path / "t.jsonl"
    task.write_text("".join(json.dumps({"context": f"Q: {w}?\nA: ", "choices": ["yes", "no"], "gold": 0}) + "\n"
                            for w in ["king", "queen", "sword"]))
    rss = eval_memory.main(["--run", tiny_runs["hope"], "--task", str(task), "--items", "0:3", "--rounds", "3",
                            "--memorize"])
    assert len(rss) == 3 and all(r > 0 for r in rss)
    out = capsys.readouterr().out
    assert "round 3: 9 items scored" in out


def test_profile_decode_reports_ms_per_token(capsys):
    ms = profile_decode.main(["--model", "transformer", "--size", "tiny", "--tokens", "3", "--top", "2"])
    assert ms > 0 and "ms per token (3 tokens" in capsys.readouterr().out
    profile_decode.main(["--model", "hope", "--size", "tiny", "--tokens", "3", "--top", "40", "--torch"])
    out = capsys.readouterr().out
    assert "aten::bmm" in out and "Self CPU time total" in out  # the decode step's ATen calls


@pytest.mark.slow
def test_probe_compile_decode_times_the_step_eager_and_compiled():
    out = probe_compile_decode.main(["--model", "transformer", "--size", "tiny", "--tokens", "4", "--rounds", "1"])
    assert out["eager"] > 0 and out["compiled"] > 0 and out["first_call_s"] > 0


@pytest.mark.slow
def test_train_memory_measures_a_run_and_its_steps(corpus_dir, tmp_path):
    extra = ["size=tiny", "data=local", f"data.path={corpus_dir}", "data.vocab_size=300",
             f"data.data_dir={tmp_path / 'data'}", "train.seq_len=16", "train.batch_size=2", "train.context_len=64",
             "model.overrides.proj_chunk=4", "model.overrides.memory_chunk=8", "model.overrides.cms_periods=[1,4,8]"]
    row = train_memory.measure("hope", 3, 0, extra)
    assert row["reached_step"] == 3 and row["peak_rss_mb"] > 50 and "error" not in row
    killed = train_memory.measure("hope", 50, 1, extra)  # 1 MB: the watchdog stops it at once
    assert killed["killed_over_mb"] == 1 and killed["reached_step"] < 50


def test_selfmod_layer_times_the_loop_and_the_op_and_finds_them_equal(tmp_path):
    rows = selfmod_layer.main(["--seq", "40", "--batch", "2", "--size", "tiny", "--rounds", "1",
                               "--json", str(tmp_path / "s.json")])
    assert rows[0]["rel_diff"] < 1e-5 and rows[0]["loop_ms"] > 0 and rows[0]["op_ms"] > 0
    assert (tmp_path / "s.json").exists()
    steps = selfmod_layer.main(["--step", "--seq", "32", "--batch", "2", "--size", "tiny", "--rounds", "1",
                                "--models", "transformer"])
    assert steps[0]["loop_ms"] > 0 and steps[0]["op_ms"] > 0 and steps[0]["others_ms"]["transformer"] > 0
    per = steps[0]["per_param_vs"]["transformer"]  # HOPE's tokens/s per parameter over the Transformer's
    p = steps[0]["params"]
    assert per["op"] == pytest.approx(steps[0]["others_ms"]["transformer"] / steps[0]["op_ms"] * p["transformer"] / p["hope"])
