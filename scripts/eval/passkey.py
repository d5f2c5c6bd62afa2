"""The passkey retrieval command line, installed as `nl-passkey`: its code and --help are
nested_learning/cli/passkey.py."""

from nested_learning.cli.passkey import main

if __name__ == "__main__":
    main()
