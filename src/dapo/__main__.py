"""`python -m dapo ...` is `dapo ...` (and `torchrun ... -m dapo train ...` works)."""

import sys

from dapo.cli import main

if __name__ == "__main__":
    sys.exit(main())
