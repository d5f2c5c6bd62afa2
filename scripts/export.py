"""The export command line, installed as `nl-export`: its code and --help are
nested_learning/cli/export.py."""

from nested_learning.cli.export import console

if __name__ == "__main__":
    console()
