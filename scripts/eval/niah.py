"""The needle-in-a-haystack command line, installed as `nl-niah`: its code and --help are
nested_learning/cli/niah.py."""

from nested_learning.cli.niah import console

if __name__ == "__main__":
    console()
