"""The lm-evaluation-harness command line, installed as `nl-lm-eval`: its code and --help are
nested_learning/cli/lm_eval.py."""

from nested_learning.cli.lm_eval import console

if __name__ == "__main__":
    console()
