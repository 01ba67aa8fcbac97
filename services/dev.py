"""`python -m services.dev`: the name `make run`'s launcher had before it moved to
services/local/ (`python -m services.local`), kept for the commands and scripts that use it."""

from services.local.launcher import main

if __name__ == "__main__":
    raise SystemExit(main())
