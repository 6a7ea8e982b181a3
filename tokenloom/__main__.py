"""`python -m tokenloom ...` runs the command line."""
import sys

from tokenloom.cli.main import main

sys.exit(main())
