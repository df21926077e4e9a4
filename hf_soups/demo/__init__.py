"""The embedded-default demo: model soups on real data, offline, on a CPU in minutes.

`hf-soups demo` (or `python -m hf_soups.demo`) trains a linear probe of all-MiniLM-L6-v2 on Rotten Tomatoes
review snippets, fine-tunes a handful of ingredients from it, cooks uniform, greedy and WiSE-FT soups with
[`hf_soups.merge_models`] and prints one table on validation, test and typo-shifted test sets.

Submodules: `data` (corpus, splits, typos, tokenizer), `train` (LP-FT training), `job` (the main job).
Importing this package is cheap; the heavy libraries load when `main` runs.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo (see `hf-soups demo --help`).

    Args:
        argv (`Sequence[str]`, *optional*):
            Command-line arguments without the program name; defaults to `sys.argv[1:]`.

    Returns:
        `int`: the exit status (0 on success).
    """
    from .job import main as _main

    return _main(argv)
