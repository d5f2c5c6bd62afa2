"""The research studies of studies/: what can be checked without their training runs."""

import pytest

from tests.helpers import run_python


@pytest.mark.parametrize("study", ["forget_sweep.py", "optimizer_compare.py", "variant_stability.py",
                                   "inner_curvature.py", "cms_lr.py", "run_health.py"])
def test_a_study_runs_as_a_file_from_the_repository_root(study):
    """`python studies/X.py` finds its sibling modules (studies/ is sys.path[0]) and the package
    (installed), with no sys.path edit."""
    r = run_python(f"studies/{study}", "--help", timeout=300)
    assert r.returncode == 0 and "usage:" in r.stdout, r.stderr


def test_the_studies_import_as_a_package():
    """Imported as studies.X (the tests; python -m studies.X), a study uses the one
    studies.variant_stability module, not a second copy."""
    import studies.forget_sweep
    import studies.optimizer_compare
    import studies.titans_memory_trace
    import studies.variant_stability as vs

    assert studies.forget_sweep.train_in_process is vs.train_in_process
    assert studies.optimizer_compare.train_in_process is vs.train_in_process
    assert studies.titans_memory_trace.raw_rules is vs.raw_rules


def test_forget_sweep_reads_the_memories_at_the_start_and_end_of_each_context():
    from studies.forget_sweep import context_end_health

    def rec(pos, rel, rms):
        mem = {f"layer{i}": {"mixer.proj": {"rel": rel}, "mixer.memory": {"rel": rel / 2}} for i in range(2)}
        return {"context_pos": pos, "health": {"memory": mem, "mixer_rms": {"layer0": rms, "layer1": rms}}}

    recs = [rec(0.0, 0.9, 0.5), rec(128.0, 0.5, 0.4), rec(0.0, 0.7, 0.3), rec(128.0, 0.1, 0.2)]
    h = context_end_health(recs)
    assert abs(h["mixer.proj_rel_start"] - 0.8) < 1e-12 and abs(h["mixer.proj_rel_end"] - 0.3) < 1e-12
    assert abs(h["mixer.memory_rel_end"] - 0.15) < 1e-12 and abs(h["mixer_rms_end"] - 0.3) < 1e-12


def test_cms_lr_table_states_the_gain_as_loss_without_minus_with_memorising():
    from studies.cms_lr import table

    row = {"cms_lr": 0.01, "train": {"final_val_loss": 5.2, "clipped_fraction": 0.05, "grad_norm_max": 3.0,
                                     "skipped_steps": 0},
           "perplexity": {"baseline": {"loss": 5.30, "bits_per_byte": 2.65},
                          "memorised": {"loss": 5.25, "bits_per_byte": 2.63}},
           "drift": {"level0": 0.02, "level1": 0.001}}
    lines = table([row])
    assert "level0 drift | level1 drift" in lines[0]
    assert lines[2] == ("| 0.01 | 5.2000 | 5.3000 | 5.2500 | +0.0500 | 2.6500 / 2.6300 | 2.00e-02 | 1.00e-03 | 5.0% | "
                        "3.00 | 0 |")


@pytest.mark.slow
def test_layer_cost_times_the_three_ways_of_bounding_the_mlp_memory():
    """studies/variant_stability.py --layer-cost: no bound, the bound in the op, the bound per
    chunk in the layer, each a positive median, and the layer's flag restored afterwards."""
    from nested_learning.layers.titans import TitansMemory
    from studies import variant_stability

    med = variant_stability.layer_cost(repeats=1)
    assert set(med) == {"no bound, one call", "bound in the op, one call", "bound in the layer, one call per chunk"}
    assert all(v > 0 for v in med.values()) and TitansMemory.mlp_bound_in_op is True


def test_run_health_refuses_a_folder_that_is_not_a_run(tmp_path):
    r = run_python("studies/run_health.py", str(tmp_path), timeout=300)
    assert r.returncode != 0 and "not a finished run folder" in r.stderr


def test_run_health_uses_the_cms_lr_studys_measurements():
    import studies.cms_lr
    import studies.run_health

    assert studies.run_health.drift is studies.cms_lr.drift and studies.run_health.grad_groups is studies.cms_lr.grad_groups
