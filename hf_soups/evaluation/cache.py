"""The opt-in on-disk cache of per-ingredient predictions (`prediction_cache_dir=`).

Scoring an ingredient alone (a greedy soup's first pass, the best single ingredient of a comparison) runs it over
every eval set. Those predictions depend only on the weights, the prepared eval set and how they are run, so they
are kept on disk, one file per (ingredient, eval set), under a key made of:

- the weights: the resolved Hub commit, or a SHA-256 of the files `from_pretrained` reads (see
  [`~hf_soups.ingredients.weights_fingerprint`]), and the live model's config (label order, architecture);
- the eval set: a SHA-256 of the prepared examples ([`fingerprint_examples`]: after tokenization, so a changed
  tokenizer or `max_length` misses too);
- the task (name, problem type, number of labels, zero-shot prompts), the metric (name and options), the batch
  size, device type and dtype, and this file format's version.

Files are safetensors (tensors plus a JSON header that repeats the whole key, checked on read), written to a
unique temporary name and renamed into place, so a reader sees a whole file or none; reading runs no code (no
pickle). Any file that cannot be read, or whose key differs, is a miss.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .tasks import Predictions

logger = logging.getLogger(__name__)

#: bumped when what a file holds changes (older files then miss)
CACHE_FORMAT = 1
_SUFFIX = ".safetensors"


def canonical_json(value: Any) -> str:
    """`value` as JSON with sorted keys (non-JSON values by `str`): the one spelling a key is hashed in."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint_examples(examples: Sequence[Mapping[str, Any]]) -> str:
    """SHA-256 of prepared examples: every column's name, dtype, shape and bytes, example by example.

    Args:
        examples (`Sequence[Mapping]`): the prepared examples of one eval set (lists, numbers or arrays per column).

    Returns:
        `str`: a hex digest; two sets have the same one only if every value of every example is the same.
    """
    import numpy as np

    digest = hashlib.sha256()
    digest.update(f"{len(examples)}\n".encode())
    for example in examples:
        for key in sorted(example):
            value = example[key]
            if hasattr(value, "detach"):  # a torch tensor
                value = value.detach().cpu().numpy()
            array = np.asarray(value)
            if array.dtype == object:
                blob = repr(value).encode()
                kind = "object"
            else:
                array = np.ascontiguousarray(array)
                blob = array.tobytes()
                kind = array.dtype.str
            digest.update(f"{key}\0{kind}\0{array.shape}\0{len(blob)}\0".encode())
            digest.update(blob)
    return digest.hexdigest()


class PredictionCache:
    """Predictions on disk, one safetensors file per key.

    Args:
        directory (`str` or `os.PathLike`): the cache folder (created on the first write).
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory).expanduser()
        self.hits = 0
        self.misses = 0

    def path_for(self, key: Mapping[str, Any]) -> Path:
        name = hashlib.sha256(canonical_json(key).encode()).hexdigest()
        return self.directory / f"{name}{_SUFFIX}"

    def load(self, key: Mapping[str, Any]) -> Predictions | None:
        """The predictions stored under `key`, or `None` (missing, unreadable, or another key in the file)."""
        from safetensors import SafetensorError, safe_open

        from .tasks import Predictions

        path = self.path_for(key)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                arrays = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no iter)
            if meta.get("key") != canonical_json(key):
                logger.warning("Prediction cache: %s holds another key; ignored.", path)
                self.misses += 1
                return None
            out = Predictions(
                logits=arrays.get("logits"),
                labels=arrays.get("labels"),
                preds=arrays.get("preds"),
                loss_sum=float(meta.get("loss_sum", "0.0")),
                loss_count=float(meta.get("loss_count", "0.0")),
            )
            n_raw = int(meta.get("raw", "0"))
            out.raw_logits = [arrays[f"raw_logits.{i}"] for i in range(n_raw)]
            out.raw_labels = [arrays.get(f"raw_labels.{i}") for i in range(n_raw)]
        except (SafetensorError, OSError, ValueError, KeyError) as err:
            logger.warning("Prediction cache: %s cannot be read (%s); scoring again.", path, err)
            self.misses += 1
            return None
        self.hits += 1
        return out

    def store(self, key: Mapping[str, Any], predictions: Predictions) -> Path:
        """Write `predictions` under `key` atomically (a unique temporary file, then a rename)."""
        import numpy as np
        from safetensors.numpy import save_file

        arrays: dict[str, np.ndarray] = {}
        for name in ("logits", "labels", "preds"):
            value = getattr(predictions, name)
            if value is not None:
                arrays[name] = np.ascontiguousarray(value)
        for i, (logits, labels) in enumerate(zip(predictions.raw_logits, predictions.raw_labels)):
            arrays[f"raw_logits.{i}"] = np.ascontiguousarray(logits)
            if labels is not None:
                arrays[f"raw_labels.{i}"] = np.ascontiguousarray(labels)
        meta = {
            "key": canonical_json(key),
            "loss_sum": repr(float(predictions.loss_sum)),
            "loss_count": repr(float(predictions.loss_count)),
            "raw": str(len(predictions.raw_logits)),
        }
        path = self.path_for(key)
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{path.stem[:16]}.", suffix=".incomplete")
        os.close(fd)
        try:
            save_file(arrays, tmp, metadata=meta)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path


__all__ = ["CACHE_FORMAT", "PredictionCache", "canonical_json", "fingerprint_examples"]
