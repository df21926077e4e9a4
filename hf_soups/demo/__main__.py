"""`python -m hf_soups.demo`: the same as `hf-soups demo`."""

import sys

from . import main

sys.exit(main())
