"""`python -m hf_soups.cli`."""

import sys

from .main import main

sys.exit(main())
