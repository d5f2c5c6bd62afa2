"""The passkey retrieval command line, installed as `nl-passkey`: its code and --help are
nested_learning/cli/passkey.py."""

from nested_learning.cli.passkey import console

if __name__ == "__main__":
    console()
