"""`python -m mirrord` is the `mirrord` command."""

import sys

from mirrord.cli import main

sys.exit(main())
