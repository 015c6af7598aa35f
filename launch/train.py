"""Entry point of dvtrain training: `python launch/train.py ...` or `accelerate launch launch/train.py ...`."""

import sys

from dvtrain.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
