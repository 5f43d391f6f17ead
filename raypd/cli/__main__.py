"""`python -m raypd.cli`: the `raypd` command."""

import sys

from raypd.cli import main

sys.exit(main())
