"""The `hf-soups` command: `merge`, `cook`, `inspect` and `demo`.

- [`main`](./main.py): the parser (flags derived from the one configuration) and the commands.
- [`inspect`](./inspect.py): `hf-soups inspect` and `--dry-run`: the compatibility report and the merge plan.
"""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
