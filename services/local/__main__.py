"""`python -m services.local` (`make run`): the launcher, services/local/launcher.py."""

from services.local.launcher import main

raise SystemExit(main())
