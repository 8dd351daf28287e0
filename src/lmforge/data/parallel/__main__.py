"""`python -m lmforge.data.parallel --fetch-de-en` (used by the set-up)."""

import sys

from ...errors import LMForgeError
from .fetch import trans_de_en_path

if "--fetch-de-en" in sys.argv:
    try:
        print(f"de-en dictionary: {trans_de_en_path()}")
    except LMForgeError as e:
        print(f"warning: {e}", file=sys.stderr)
