"""`python -m jaxinf`: the command line (`jaxinf.cli`)."""

import sys

from jaxinf.cli import main

sys.exit(main())
