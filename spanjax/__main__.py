"""`python -m spanjax` is the `spanjax` command."""

import sys

from spanjax.cli import main

sys.exit(main())
