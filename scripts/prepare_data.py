"""The corpus preparation command line, installed as `nl-prepare-data`: its code and --help are
nested_learning/cli/prepare_data.py."""

from nested_learning.cli.prepare_data import console

if __name__ == "__main__":
    console()
