"""``python -m lmforge``: the command line, also what ``torchrun ... -m lmforge train`` starts in each process."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
