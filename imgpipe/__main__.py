"""`python -m imgpipe`: the same as the `imgpipe` command."""

from __future__ import annotations

import sys

from imgpipe.cli import main

if __name__ == "__main__":
    sys.exit(main())
