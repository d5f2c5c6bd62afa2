"""Convert a run (or one of its checkpoints) into a Hugging Face transformers model directory:
model.safetensors, config.json and the tokenizer. Needs the [hf] extra.

    python scripts/to_hf.py --run runs/hope-smoke --out hf/hope-smoke

Then, in Python (importing nested_learning.hf registers the model types with the Auto classes):

    import nested_learning.hf
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("hf/hope-smoke")
    tok = AutoTokenizer.from_pretrained("hf/hope-smoke")
    out = model.generate(**tok("To be, or not to be", return_tensors="pt"), max_new_tokens=20)"""

from __future__ import annotations

import argparse

from nested_learning.cli._common import command
from nested_learning.hf import convert_run


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a run directory of train.py, or one of its checkpoints")
    ap.add_argument("--step", type=int, default=None, help="the run's checkpoint at this step (default: latest)")
    ap.add_argument("--out", required=True, help="the transformers model directory to write")
    a = ap.parse_args(argv)
    out = convert_run(a.run, a.out, a.step)
    print(f"wrote {out}: load it with AutoModelForCausalLM.from_pretrained after `import nested_learning.hf`")
    return out


console = command(main)


if __name__ == "__main__":
    console()
