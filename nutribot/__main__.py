"""`python -m nutribot ...` is the `nutribot` command."""

import sys

from nutribot.cli import main

sys.exit(main())
