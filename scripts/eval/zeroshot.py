"""The zero-shot evaluation command line, installed as `nl-zeroshot`: its code and --help are
nested_learning/cli/zeroshot.py."""

from nested_learning.cli.zeroshot import console

if __name__ == "__main__":
    console()
