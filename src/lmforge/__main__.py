"""``python -m lmforge``: the command line, also what ``torchrun ... -m lmforge train`` starts in each process."""

import sys

if __name__ == "__main__":
    try:
        from .cli import main

        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C while Python is still importing, before the command's own handling
        print("\nlmforge: interrupted", file=sys.stderr)
        sys.exit(130)
