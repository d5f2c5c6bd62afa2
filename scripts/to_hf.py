"""The Hugging Face conversion command line, installed as `nl-to-hf`: its code and --help are
nested_learning/cli/to_hf.py."""

from nested_learning.cli.to_hf import console

if __name__ == "__main__":
    console()
