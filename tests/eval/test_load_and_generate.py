"""load_run rebuilds a trained run; generate streams the prompt and decodes with the state."""

import json
import os
import shutil

import pytest
import torch

from nested_learning.models import build_model
from nested_learning.runs import checkpoint, load_run
from nested_learning.runs.checkpoint import CheckpointError
from tests.eval.conftest import OVERRIDES


@pytest.mark.parametrize("name", list(OVERRIDES))
def test_load_run_rebuilds_the_trained_model(tiny_runs, name):
    from safetensors.torch import load_file

    model, tok = load_run(tiny_runs[name], device="cpu")
    assert model.run_info.model == name and model.run_info.step == 4 and not model.training
    saved = load_file(os.path.join(tiny_runs[name], "checkpoints", "step_00000004", "model.safetensors"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    assert tok.get_vocab_size() == model.config.vocab_size
    earlier, _ = load_run(tiny_runs[name], step=2, device="cpu")
    assert earlier.run_info.step == 2
    ck, _ = load_run(os.path.join(tiny_runs[name], "checkpoints", "step_00000002"), device="cpu")
    assert ck.run_info.step == 2 and ck.run_info.run_dir == tiny_runs[name]


def test_load_run_errors_say_what_to_do(tiny_runs, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_run(str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match="no checkpoint at step 3; it has"):
        load_run(tiny_runs["hope"], step=3)
    with pytest.raises(CheckpointError, match="holds a 'hope' model, not 'titans'"):
        load_run(tiny_runs["hope"], model="titans")
    bad = tmp_path / "bad"
    shutil.copytree(tiny_runs["hope"], bad)
    ck = bad / "checkpoints" / "step_00000004"
    data = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match=r"model.safetensors has \d+ bytes.*steps \[2\]: pass step=N"):
        load_run(str(bad))  # the newest is damaged: an error naming the file, not a silent older step
    assert load_run(str(bad), step=2, device="cpu")[0].run_info.step == 2
    meta = json.loads((ck / "meta.json").read_text())
    shutil.copy(os.path.join(tiny_runs["titans"], "checkpoints", "step_00000004", "model.safetensors"),
                ck / "model.safetensors")  # another model's weights under hope's meta
    checkpoint.write_checksums(str(ck))  # (consistently written, so the checksums pass)
    with pytest.raises(CheckpointError, match="do not fit the recorded hope config"):
        load_run(str(bad))
    (ck / "meta.json").write_text(json.dumps({**meta, "model": "gpt"}))
    with pytest.raises(CheckpointError, match=r"meta.json has \d+ bytes, \d+ were written"):
        load_run(str(bad))  # an edited meta.json fails its checksum
    checkpoint.write_checksums(str(ck))
    with pytest.raises(CheckpointError, match="no known model"):
        load_run(str(bad))


SMALL = dict(hope=dict(proj_chunk=4, memory_chunk=8, cms_periods=(1, 4)), titans=dict(chunk_size=4), transformer={})


@pytest.mark.parametrize("name", list(SMALL))
def test_greedy_generation_equals_recomputing_the_whole_sequence(name):
    torch.manual_seed(0)
    m = build_model(name, "tiny", **SMALL[name]).eval()
    prompt = torch.randint(0, 64, (2, 13))
    out, state = m.generate(prompt, 7, segment=5)  # the prompt streams in segments of 5
    seq = prompt
    for _ in range(7):
        with torch.no_grad():
            logits, _ = m(seq)
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq[:, 13:])
    assert torch.equal(m.generate(prompt, 7)[0], out)  # deterministic, any segment length
    assert state.position == 13 + 7  # the state consumed the prompt and every returned token
    x = torch.randint(0, 64, (2, 3))  # the returned state continues the stream prompt + new tokens
    with torch.no_grad():
        torch.testing.assert_close(m(x, state)[0], m(x, m(seq)[1])[0])


def test_sampling_eos_and_bad_arguments():
    torch.manual_seed(0)
    m = build_model("transformer", "tiny").eval()
    p = torch.randint(0, 64, (3, 5))
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    a, _ = m.generate(p, 12, temperature=1.0, top_k=5, generator=g())
    b, _ = m.generate(p, 12, temperature=1.0, top_k=5, generator=g())
    assert torch.equal(a, b)
    top5 = None
    with torch.no_grad():
        top5 = m(p)[0][:, -1].topk(5).indices
    assert all(a[i, 0] in top5[i] for i in range(3))  # the first sample is among the top 5
    greedy, _ = m.generate(p, 12)
    eos = int(greedy[0, 2])
    out, _ = m.generate(p, 12, eos=eos)
    row = out[0].tolist()
    assert row[2] == eos and set(row[2:]) == {eos}  # after eos, only eos
    assert m.generate(p[0], 3)[0].shape == (1, 3)  # a 1-D prompt is one sequence
    for kw, msg in [(dict(max_new_tokens=0), "max_new_tokens"), (dict(max_new_tokens=2, temperature=-1), "temperature"),
                    (dict(max_new_tokens=2, top_k=0), "top_k")]:
        with pytest.raises(ValueError, match=msg):
            m.generate(p, **kw)
    with pytest.raises(ValueError, match="non-empty integer"):
        m.generate(p[:, :0], 2)
