"""`python -m dapo ...` is the `dapo` command."""

import sys

from dapo.cli import main

sys.exit(main())
