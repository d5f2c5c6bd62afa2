"""The continual-learning command line, installed as `nl-continual`: its code and --help are
nested_learning/cli/continual.py."""

from nested_learning.cli.continual import console

if __name__ == "__main__":
    console()
