"""The campaign report generator, installed as `nl-make-report`: its code and --help are
nested_learning/cli/make_report.py."""

from nested_learning.cli.make_report import console

if __name__ == "__main__":
    console()
