"""The report command line, installed as `nl-report`: its code and --help are
nested_learning/cli/report.py."""

from nested_learning.cli.report import console

if __name__ == "__main__":
    console()
