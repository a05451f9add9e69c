"""The `spanjax` command line: `main.py` holds the subcommands, `plan.py` the
`spanjax query plan` printer. Only argparse is imported up front, so `spanjax --help`
stays fast; each subcommand imports what it runs."""

from spanjax.cli.main import main

__all__ = ["main"]
