"""The seed example: `python train.py` teaches the default model to answer "5" (same as `dapo train`)."""

import sys

from dapo.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
