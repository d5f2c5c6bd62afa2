"""The experiment campaign runner, installed as `nl-campaign`: its code and --help are
nested_learning/cli/campaign.py."""

from nested_learning.cli.campaign import console

if __name__ == "__main__":
    console()
