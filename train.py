"""Train a HOPE, Titans or Transformer language model: `python train.py [overrides]`, `torchrun ...
train.py ...` or `nl-train`; the code, usage and Hydra set-up are in nested_learning/cli/train.py."""

from nested_learning.cli.train import console

if __name__ == "__main__":
    console()
