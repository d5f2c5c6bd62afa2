"""The command lines, one module per command, each with `main(argv=None)`; installed as console
entry points (pyproject.toml, `[project.scripts]`) and called by the thin files under scripts/
and by train.py, whose commands the README gives:

    nl-prepare-data  scripts/prepare_data.py    nl-niah       scripts/eval/niah.py
    nl-generate      scripts/generate.py        nl-passkey    scripts/eval/passkey.py
    nl-export        scripts/export.py          nl-continual  scripts/eval/continual.py
    nl-zeroshot      scripts/eval/zeroshot.py   nl-lm-eval    scripts/eval/lm_eval.py
    nl-perplexity    scripts/eval/perplexity.py nl-recall     scripts/eval/recall.py
    nl-report        scripts/eval/report.py     nl-train      train.py

This is the top layer: it may import anything in the package, and nothing in the package
imports it."""
