"""The text generation command line, installed as `nl-generate`: its code and --help are
nested_learning/cli/generate.py."""

from nested_learning.cli.generate import console

if __name__ == "__main__":
    console()
