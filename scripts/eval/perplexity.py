"""The long-document perplexity command line, installed as `nl-perplexity`: its code and --help are
nested_learning/cli/perplexity.py."""

from nested_learning.cli.perplexity import console

if __name__ == "__main__":
    console()
