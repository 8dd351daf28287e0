"""``python -m lmforge``: the command line, also what ``torchrun ... -m lmforge train`` starts in each process."""

import sys

if __name__ == "__main__":
    try:
        from .cli import main

        sys.exit(main())
    except BaseException as e:  # Ctrl-C while Python is still importing, before the command's own handling
        # (an import can wrap the KeyboardInterrupt, e.g. a RuntimeError from a class's __set_name__)
        cause: BaseException | None = e
        while cause is not None and not isinstance(cause, KeyboardInterrupt):
            cause = cause.__cause__ or cause.__context__
        if cause is None or isinstance(e, SystemExit):
            raise
        print("\nlmforge: interrupted", file=sys.stderr)
        sys.exit(130)
