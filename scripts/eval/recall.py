"""The associative recall (MQAR) command line, installed as `nl-recall`: its code and --help are
nested_learning/cli/recall.py."""

from nested_learning.cli.recall import console

if __name__ == "__main__":
    console()
