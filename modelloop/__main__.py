"""``python -m modelloop`` runs the CLI."""

import sys

from modelloop.cli import main

sys.exit(main())
