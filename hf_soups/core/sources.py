"""Lazy tensor reading and atomic, streamed, sharded safetensors writing.

Reading never maps whole checkpoints into memory: safetensors files are read one tensor at a time with
plain reads into a caller-provided, reused buffer, so the resident memory of a soup does not grow with
the number or the size of the ingredients. `pytorch_model.bin` files are loaded with `weights_only=True`
(memory-mapped when they use torch's zip format); in-memory models are read through their state dict,
without copies. Which files of a folder are read follows `transformers`' `from_pretrained`
([`find_weight_files`]); weight indexes name files inside their folder only, each tensor once.

Writing knows every tensor's shape and dtype before the first byte: each shard's header is written
first, then tensor bytes are appended as they are computed, into a temporary directory that is renamed
into place only when everything succeeded.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import struct
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CorruptCheckpointError, IngredientNotFoundError, SoupError
from ..utils import numel, parse_size

if TYPE_CHECKING:  # pragma: no cover
    import torch

logger = logging.getLogger(__name__)

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "pytorch_model.bin"
WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"

# safetensors dtype string -> (torch dtype attribute name, item size in bytes)
_ST_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "U16": ("uint16", 2),
    "U32": ("uint32", 4),
    "U64": ("uint64", 8),
    "BOOL": ("bool", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    return getattr(torch, name)


def dtype_to_safetensors(dtype: torch.dtype) -> str:
    """The safetensors dtype string of a torch dtype."""
    name = str(dtype).removeprefix("torch.")
    for key, (torch_name, _) in _ST_DTYPES.items():
        if torch_name == name:
            return key
    raise SoupError(f"dtype {dtype} cannot be stored in safetensors by hf_soups.")


def parse_dtype(dtype: Any) -> torch.dtype | None:
    """Turn `"bfloat16"`, `"torch.float16"`, `"fp16"`, a `torch.dtype` or None into a torch dtype (or None)."""
    if dtype is None or dtype == "auto":
        return None
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    aliases = {
        "fp32": "float32",
        "fp16": "float16",
        "half": "float16",
        "bf16": "bfloat16",
        "float": "float32",
    }
    name = str(dtype).removeprefix("torch.")
    name = aliases.get(name, name)
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        from ..errors import InvalidArgumentError

        raise InvalidArgumentError(
            f"dtype={dtype!r} is not a floating point dtype; use one of float32, float16, bfloat16."
        )
    return value


@dataclass(frozen=True)
class TensorInfo:
    """Shape, dtype and size of one stored tensor, known without reading it."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int

    @property
    def numel(self) -> int:
        return numel(self.shape)


class TensorSource:
    """Lazy, read-only access to the tensors of one ingredient, one tensor at a time.

    Subclasses implement `keys`, `info` and `get`. `get(name, buffer=...)` may return a view into the
    given uint8 buffer, valid until the next call that uses the same buffer.
    """

    description: str = ""

    def keys(self) -> list[str]:
        raise NotImplementedError

    def info(self, name: str) -> TensorInfo:
        raise NotImplementedError

    def get(self, name: str, buffer: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def range_readable(self, name: str) -> bool:
        """Whether [`get_range`] reads a slice of `name` without materialising the whole tensor.

        The engine streams large tensors in small, cache-sized slices when every ingredient can; sources
        that compute their tensors (adapters) answer `False` and are read whole.
        """
        return False

    def get_range(
        self, name: str, start: int, count: int, buffer: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Elements `start` to `start + count` of the flattened tensor `name`, as a 1-D tensor.

        May return a view into the given uint8 `buffer`, valid until the next call that uses it. This
        default reads the whole tensor; sources whose [`range_readable`] is `True` read only the slice.
        """
        return self.get(name).reshape(-1)[start : start + count]

    def close(self) -> None:
        """Release open files. The source can still be used afterwards (files are reopened)."""

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_safetensors_header(path: Path) -> tuple[dict[str, dict], int]:
    """Read and validate the header of a safetensors file.

    Returns:
        `tuple[dict, int]`: the tensor entries (name -> {dtype, shape, data_offsets}) and the offset of
        the data section in the file.

    Raises:
        [`CorruptCheckpointError`]: the header is unreadable or points outside the file.
    """
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise IngredientNotFoundError(f"Weight file {path} does not exist.") from None
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptCheckpointError(
                f"{path} is not a safetensors file: it has {size} bytes, fewer than the 8-byte header length. "
                "The download or save was probably interrupted: download or save it again.",
                path=str(path),
            )
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER_BYTES or 8 + n > size:
            raise CorruptCheckpointError(
                f"{path} has a corrupt safetensors header (declared header length {n} bytes, file size {size} "
                "bytes). The file is truncated or not a safetensors file: download or save it again.",
                path=str(path),
            )
        raw = f.read(n)
    try:
        header = json.loads(raw, object_pairs_hook=_refuse_duplicate_keys)
    except _DuplicateKey as e:
        raise CorruptCheckpointError(
            f"{path}: the safetensors header lists tensor {e.key!r} twice; which entry is meant is ambiguous. "
            "Download or save the file again.",
            path=str(path),
            tensor_name=e.key,
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(
            f"{path} has an unreadable safetensors header ({e}). Download or save the file again.",
            path=str(path),
        ) from None
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{path} has a malformed safetensors header.", path=str(path))
    header.pop("__metadata__", None)
    data_start = 8 + n
    data_size = size - data_start
    for name, entry in header.items():
        try:
            dtype_str, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            _, itemsize = _ST_DTYPES[dtype_str]
        except (KeyError, TypeError, ValueError):
            raise CorruptCheckpointError(
                f"{path}: tensor {name!r} has a malformed header entry {entry!r}.",
                path=str(path),
                tensor_name=name,
            ) from None
        if end - begin != numel(shape) * itemsize or begin < 0:
            raise CorruptCheckpointError(
                f"{path}: tensor {name!r} declares shape {shape} ({dtype_str}) but spans {end - begin} bytes.",
                path=str(path),
                tensor_name=name,
            )
        if end > data_size:
            raise CorruptCheckpointError(
                f"{path} is truncated: tensor {name!r} ends at byte {data_start + end} but the file has {size} "
                "bytes. Download or save the file again.",
                path=str(path),
                tensor_name=name,
            )
    # as the safetensors library: the tensors tile the data section, no overlap and no gap
    position = 0
    for name, entry in sorted(header.items(), key=lambda item: tuple(item[1]["data_offsets"])):
        begin, end = entry["data_offsets"]
        if begin != position:
            raise CorruptCheckpointError(
                f"{path}: tensor {name!r} starts at data byte {begin}, expected {position} (tensors overlap or leave "
                "gaps). The file is corrupt: download or save it again.",
                path=str(path),
                tensor_name=name,
            )
        position = end
    return header, data_start


class SafetensorsSource(TensorSource):
    """Tensors of one or several (sharded) safetensors files, read with plain reads.

    Args:
        files (`Sequence[Path]`):
            The safetensors files (all shards).
        description (`str`):
            How to name this source in messages (usually the ingredient's folder).
    """

    def __init__(self, files: Sequence[Path], description: str = ""):
        self.description = description or str(files[0].parent)
        self._entries: dict[str, tuple[Path, int, int, str, tuple[int, ...]]] = {}
        for path in files:
            header, data_start = read_safetensors_header(path)
            for name, entry in header.items():
                if name in self._entries:
                    _refuse_duplicate_tensor(name, self._entries[name][0], path)
                begin, end = entry["data_offsets"]
                self._entries[name] = (
                    path,
                    data_start + begin,
                    end - begin,
                    entry["dtype"],
                    tuple(entry["shape"]),
                )
        self._handles: dict[Path, Any] = {}
        self._open_lock = threading.Lock()  # readers may share this source across threads

    def keys(self) -> list[str]:
        return list(self._entries)

    def info(self, name: str) -> TensorInfo:
        _, _, nbytes, dtype_str, shape = self._entries[name]
        return TensorInfo(shape=shape, dtype=_torch_dtype(_ST_DTYPES[dtype_str][0]), nbytes=nbytes)

    def get(self, name: str, buffer: torch.Tensor | None = None) -> torch.Tensor:
        import torch

        path, offset, nbytes, dtype_str, shape = self._entries[name]
        dtype = _torch_dtype(_ST_DTYPES[dtype_str][0])
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        raw = self._read(name, path, offset, nbytes, buffer)
        return raw.view(dtype).view(shape)

    def range_readable(self, name: str) -> bool:
        return True

    def get_range(
        self, name: str, start: int, count: int, buffer: torch.Tensor | None = None
    ) -> torch.Tensor:
        import torch

        path, offset, nbytes, dtype_str, shape = self._entries[name]
        dtype_name, itemsize = _ST_DTYPES[dtype_str]
        if start < 0 or count < 0 or (start + count) * itemsize > nbytes:
            raise SoupError(
                f"internal error: elements {start}:{start + count} of tensor {name!r} are out of range."
            )
        if count == 0:
            return torch.empty(0, dtype=_torch_dtype(dtype_name))
        raw = self._read(name, path, offset + start * itemsize, count * itemsize, buffer)
        return raw.view(_torch_dtype(dtype_name))

    def _read(
        self, name: str, path: Path, offset: int, nbytes: int, buffer: torch.Tensor | None
    ) -> torch.Tensor:
        """`nbytes` bytes at `offset` of `path`, read with plain reads into (the start of) `buffer`."""
        import torch

        if buffer is None or buffer.numel() < nbytes:
            buffer = torch.empty(nbytes, dtype=torch.uint8)
        raw = buffer[:nbytes]
        f = self._handles.get(path)
        if f is None:
            with self._open_lock:
                f = self._handles.get(path)
                if f is None:
                    f = self._handles[path] = open(path, "rb", buffering=0)
        fd = f.fileno()
        view = memoryview(raw.numpy())
        got = 0
        while got < nbytes:  # positional reads: no shared file offset, so threads may read one file at once
            n = os.preadv(fd, [view[got:]], offset + got)
            if not n:
                raise CorruptCheckpointError(
                    f"{path} ended while reading tensor {name!r}: the file was truncated after it was opened.",
                    path=str(path),
                    tensor_name=name,
                )
            got += n
        return raw

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()


class StateDictSource(TensorSource):
    """Tensors of an in-memory state dict (or model), without copies."""

    def __init__(self, state_dict: dict[str, torch.Tensor], description: str = "in-memory model"):
        self.description = description
        self._sd = state_dict

    def keys(self) -> list[str]:
        return list(self._sd)

    def info(self, name: str) -> TensorInfo:
        t = self._sd[name]
        return TensorInfo(shape=tuple(t.shape), dtype=t.dtype, nbytes=t.numel() * t.element_size())

    def get(self, name: str, buffer: torch.Tensor | None = None) -> torch.Tensor:
        t = self._sd[name]
        return t.detach().cpu() if t.device.type != "cpu" else t.detach()

    def range_readable(self, name: str) -> bool:
        t = self._sd[name]
        return t.device.type == "cpu" and t.is_contiguous()

    def get_range(
        self, name: str, start: int, count: int, buffer: torch.Tensor | None = None
    ) -> torch.Tensor:
        if not self.range_readable(name):
            return super().get_range(name, start, count, buffer)
        return self._sd[name].detach().view(-1)[start : start + count]


class TorchBinSource(StateDictSource):
    """Tensors of `pytorch_model.bin` files, loaded with `weights_only=True` as `from_pretrained` loads them.

    Files in torch's zip format are memory-mapped; legacy (non-zip) files, which torch cannot map, are read
    into memory. A file whose pickle holds anything but tensors and plain containers (code, custom classes)
    is refused without running it.
    """

    def __init__(self, files: Sequence[Path], description: str = ""):
        state: dict[str, torch.Tensor] = {}
        origin: dict[str, Path] = {}
        for path in files:
            loaded = _torch_load_weights(path)
            for k, v in loaded.items():
                if not hasattr(v, "shape"):
                    continue
                if k in origin:
                    _refuse_duplicate_tensor(k, origin[k], path)
                state[k], origin[k] = v, path
        super().__init__(state, description or str(files[0].parent))


def _torch_load_weights(path: Path) -> dict[str, Any]:
    """`torch.load(path, weights_only=True)`, memory-mapped for zip files, with errors that say what to do."""
    import pickle
    import zipfile

    import torch

    if not path.exists():
        raise IngredientNotFoundError(f"Weight file {path} does not exist.")
    try:
        zipped = zipfile.is_zipfile(path)
        return_value = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as e:
        if "weights only load failed" not in str(e).lower():
            raise _corrupt_bin(path, e) from None
        detail = next((line.strip() for line in str(e).splitlines() if "Unsupported" in line), "")
        detail = detail.split(". Please use")[0].removeprefix("WeightsUnpickler error: ")
        raise CorruptCheckpointError(
            f"{path} holds objects other than tensors ({detail or 'a pickled object'}), which could run code "
            "when loaded: it is not loaded, for safety (torch.load(weights_only=True), as transformers does). "
            "Convert the checkpoint to safetensors where you trust it (load it with weights_only=False, then "
            "save_pretrained), and use that copy.",
            path=str(path),
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise _corrupt_bin(path, e) from None
    if not isinstance(return_value, dict):
        raise CorruptCheckpointError(
            f"{path} holds a {type(return_value).__name__}, not a state dict (tensor names to tensors). Save the "
            "model with save_pretrained.",
            path=str(path),
        )
    return return_value


def _corrupt_bin(path: Path, e: BaseException) -> CorruptCheckpointError:
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return CorruptCheckpointError(
        f"{path} cannot be loaded as a PyTorch checkpoint ({first_line}). The file is truncated or corrupted: "
        "download or save it again (preferably as safetensors).",
        path=str(path),
    )


def _refuse_duplicate_tensor(name: str, first: Path, second: Path) -> None:
    raise CorruptCheckpointError(
        f"Tensor {name!r} is stored twice, in {first} and in {second}; which copy is meant is ambiguous (loaders "
        "keep whichever they read last). The checkpoint folder mixes two saves: save the model again into an "
        "empty folder (or remove the stale shard).",
        path=str(second),
        tensor_name=name,
    )


@dataclass(frozen=True)
class WeightFiles:
    """The weight files of a checkpoint folder: what `from_pretrained` would read.

    Attributes:
        format (`str`): `"safetensors"` or `"bin"`.
        files (`tuple[Path, ...]`): the files to read (the shards of `index`, or one file).
        index (`Path`, *optional*): the weight index the shards come from.
        ignored (`tuple[Path, ...]`): other weight files of the folder, which are not read.
    """

    format: str  # "safetensors" | "bin"
    files: tuple[Path, ...]
    index: Path | None = None
    ignored: tuple[Path, ...] = ()

    def missing(self) -> list[Path]:
        """The files to read that are not in the folder (yet): the index first, then shards."""
        wanted = ([self.index] if self.index is not None else []) + list(self.files)
        return [f for f in wanted if not f.is_file()]


def weight_file_names(prefix: str = "model") -> list[tuple[str, str, bool]]:
    """`(format, file name, is_index)` in the order in which `from_pretrained` looks for them.

    transformers (`modeling_utils._get_resolved_checkpoint_files`) takes the first that exists of
    `model.safetensors`, `model.safetensors.index.json`, `pytorch_model.bin`, `pytorch_model.bin.index.json`
    (a single file before an index, safetensors before pickles). Adapters (`prefix="adapter_model"`) follow
    the same order with their own names.
    """
    bin_prefix = "pytorch_model" if prefix == "model" else prefix
    return [
        ("safetensors", f"{prefix}.safetensors", False),
        ("safetensors", f"{prefix}.safetensors.index.json", True),
        ("bin", f"{bin_prefix}.bin", False),
        ("bin", f"{bin_prefix}.bin.index.json", True),
    ]


_warned_folders: set[tuple[str, str]] = set()


def find_weight_files(
    folder: Path, prefix: str = "model", *, require_files: bool = True
) -> WeightFiles | None:
    """The weights of a `save_pretrained` folder, chosen exactly as `from_pretrained` chooses them.

    The first present of [`weight_file_names`] is read, unless `config.json` names the weights file
    (`transformers_weights`, as transformers honours it). When the folder also holds another form of the same
    weights (a stale index beside `model.safetensors`, or a stale `model.safetensors` beside an index and its
    shards), the files are read as transformers reads them and a warning names both.

    Args:
        folder (`Path`): the checkpoint folder.
        prefix (`str`, defaults to `"model"`): `"adapter_model"` for PEFT adapters.
        require_files (`bool`, defaults to `True`): raise when a shard named by the index is absent. The Hub
            download passes `False` to learn which shards to fetch ([`WeightFiles.missing`]).

    Returns:
        [`WeightFiles`], or `None` when the folder holds no known weight file.

    Raises:
        [`CorruptCheckpointError`]: an index is unreadable, names a file outside its folder or a tensor twice,
            or `config.json`'s `transformers_weights` is not a weights file inside the folder.
        [`IngredientNotFoundError`]: an index names a shard that does not exist (with `require_files`).
    """
    folder = Path(folder)
    candidates = weight_file_names(prefix)
    present = [c for c in candidates if (folder / c[1]).is_file()]
    explicit = _explicit_weights_name(folder) if prefix == "model" else None
    if explicit is not None:
        is_index = explicit.endswith(".index.json")
        chosen = ("safetensors" if ".safetensors" in explicit else "bin", explicit, is_index)
        if not (folder / explicit).is_file():
            if require_files:
                raise IngredientNotFoundError(
                    f"{folder / 'config.json'} names the weights file {explicit!r} (transformers_weights), which is "
                    f"not in {folder}. Download or save the checkpoint again."
                )
            return WeightFiles(
                chosen[0], () if is_index else (folder / explicit,), folder / explicit if is_index else None
            )
    elif present:
        chosen = present[0]
    else:
        return None
    fmt, name, is_index = chosen
    ignored = tuple(folder / c[1] for c in present if c[1] != name)
    if is_index:
        index = folder / name
        files = tuple(folder / shard for shard in _read_weight_index(index))
        if require_files:
            missing = [f.relative_to(folder).as_posix() for f in files if not f.is_file()]
            if missing:
                raise IngredientNotFoundError(
                    f"{index} names shard(s) {missing} that are not in {folder}. The download or save is "
                    "incomplete: download or save the checkpoint again."
                )
        weights = WeightFiles(fmt, files, index, ignored)
    else:
        weights = WeightFiles(fmt, (folder / name,), None, ignored)
    _warn_about_ignored(folder, weights)
    return weights


def _warn_about_ignored(folder: Path, weights: WeightFiles) -> None:
    """Warn (once per folder) when another form of the same weights sits beside the files that are read."""
    read_name = (weights.index or weights.files[0]).name if (weights.index or weights.files) else ""
    same_format = [
        p.name for p in weights.ignored if p.name.endswith((".safetensors", ".safetensors.index.json"))
    ]
    if weights.format == "bin":
        same_format = [p.name for p in weights.ignored if p.name.endswith((".bin", ".bin.index.json"))]
    if not same_format:
        if weights.ignored:
            logger.debug(
                "%s: reading %s; not reading %s", folder, read_name, [p.name for p in weights.ignored]
            )
        return
    key = (str(folder), read_name)
    if key in _warned_folders:
        return
    _warned_folders.add(key)
    logger.warning(
        "%s holds both %s and %s, which may hold different weights (one is left over from an earlier save). "
        "Reading %s, as transformers' from_pretrained does; delete the stale file(s) to silence this warning.",
        folder,
        read_name,
        " and ".join(same_format),
        read_name,
    )


def _explicit_weights_name(folder: Path) -> str | None:
    """`transformers_weights` of the folder's `config.json` (validated as transformers does), if any."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return None  # reported by whoever reads the config
    name = config.get("transformers_weights") if isinstance(config, dict) else None
    if name is None:
        return None
    if not isinstance(name, str) or not name.endswith((".safetensors", ".safetensors.index.json")):
        raise CorruptCheckpointError(
            f"{config_file}: transformers_weights={name!r} is neither a safetensors file nor a safetensors index "
            "(transformers refuses it too). Remove the key or name the weights file.",
            path=str(config_file),
        )
    _check_relative_name(name, config_file, "transformers_weights")
    return name


def _check_relative_name(name: Any, source: Path, entry: str) -> None:
    """Refuse a file name read from `source` that is not a plain relative path inside `source`'s folder."""
    reason = None
    if not isinstance(name, str) or not name:
        reason = "is not a file name"
    elif "\\" in name or "\x00" in name:
        reason = "holds a backslash or a NUL character"
    elif name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        reason = "is an absolute path"
    elif any(part in ("..", "") for part in name.split("/")):
        reason = "leaves the folder (a '..' or empty path component)"
    if reason is not None:
        raise CorruptCheckpointError(
            f"{source}: {entry} names the file {name!r}, which {reason}. Weight files must be named relative to "
            f"the checkpoint folder {source.parent} and lie inside it; hf_soups does not follow such names. Fix or "
            "regenerate the index (save_pretrained writes a correct one).",
            path=str(source),
        )


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key, seen[key], value)
        seen[key] = value
    return seen


class _DuplicateKey(ValueError):
    def __init__(self, key: str, first: Any, second: Any):
        super().__init__(key)
        self.key, self.first, self.second = key, first, second


def _read_weight_index(index: Path) -> list[str]:
    """The shard names of a weight index, sorted, each a plain relative path inside the index's folder."""
    try:
        data = json.loads(index.read_text(), object_pairs_hook=_refuse_duplicate_keys)
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError(f"weight_map is a {type(weight_map).__name__}, not an object")
    except _DuplicateKey as e:
        raise CorruptCheckpointError(
            f"{index} lists {e.key!r} twice ({e.first!r} and {e.second!r}); which file holds it is ambiguous. "
            "Fix or regenerate the index (save_pretrained writes a correct one).",
            path=str(index),
            tensor_name=e.key,
        ) from None
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CorruptCheckpointError(
            f"{index} is not a valid weight index ({type(e).__name__}: {e}).", path=str(index)
        ) from None
    for tensor, shard in weight_map.items():
        _check_relative_name(shard, index, f"weight_map[{tensor!r}]")
    return sorted(set(weight_map.values()))


def open_weight_files(weights: WeightFiles, description: str = "") -> TensorSource:
    """Open the weight files found by [`find_weight_files`] as a lazy [`TensorSource`]."""
    if weights.format == "safetensors":
        return SafetensorsSource(weights.files, description)
    return TorchBinSource(weights.files, description)


# --------------------------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class _Slot:
    shard: int
    offset: int  # absolute offset in the shard file
    nbytes: int
    itemsize: int


class AtomicDirectory:
    """A temporary folder beside `target` that replaces `target` only on [`commit`].

    The ownership rules of [`hf_soups.core.output_dir`] apply: an existing `target` is replaced only when it is
    empty or was written by hf_soups (it holds the `.hf_soups` marker and nothing else); an `output_dir`
    that is, holds or lies inside one of `ingredients` is refused. Both are checked before anything is
    created. A symlinked `target` is written through: the folder it points to is replaced, the link stays.

    An exception before `commit` (Ctrl-C and SIGTERM included) removes the temporary folder and leaves
    `target` as it was; after SIGTERM the process then exits with status 143, as it would have by default.
    Disk-full and read-only errors become an [`OutputWriteError`] naming the path and the fix. Temporary
    folders that earlier killed writes left in the same parent are removed first.

    Args:
        target (`str` or `os.PathLike`):
            The folder to write.
        ingredients (`Iterable`, *optional*):
            Ingredients (references or resolved) whose folders must not be written.
        argument (`str`, *optional*, defaults to `"output_dir"`):
            How to name `target` in messages.

    Raises:
        [`OutputDirError`]: `target` must not be written (see above).
        [`OutputWriteError`]: the temporary folder cannot be created (read-only location, disk full).
    """

    def __init__(
        self, target: str | os.PathLike, *, ingredients: Iterable[Any] = (), argument: str = "output_dir"
    ):
        from .output_dir import (
            TEMP_PREFIX,
            Terminated,
            TerminationGuard,
            as_write_error,
            check_output_dir,
            owner_fields,
            sweep_stale_work_dirs,
            write_marker,
        )

        self.given = Path(target).expanduser().absolute()
        self.target = check_output_dir(self.given, ingredients, argument=argument)
        self._argument = argument
        self._done = False
        self._guard = TerminationGuard()
        parent = self.target.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            sweep_stale_work_dirs(parent)
            self._guard.install()
            while True:
                self.token = uuid.uuid4().hex[:8]
                self.path = parent / f"{TEMP_PREFIX}{self.token}"
                try:
                    self.path.mkdir()
                    break
                except FileExistsError:
                    continue
            write_marker(self.path, state="writing", id=self.token, target=self.target.name, **owner_fields())
        except BaseException as e:
            if getattr(self, "path", None) is not None:
                shutil.rmtree(self.path, ignore_errors=True)
            self._guard.uninstall()
            if isinstance(e, Terminated):
                self._guard.deliver(e.signum)
            wrapped = as_write_error(e, self.target, None)
            if wrapped is not None:
                raise wrapped from e
            raise

    def commit(self) -> Path:
        """Move the finished folder into place (synced to disk first); returns the target path."""
        from .output_dir import (
            MARKER_NAME,
            OLD_PREFIX,
            check_replaceable,
            fsync_dir,
            fsync_tree,
            owner_fields,
            write_marker,
        )

        files = sorted(p.name for p in self.path.iterdir() if p.name != MARKER_NAME)
        write_marker(
            self.path, state="complete", id=self.token, target=self.target.name, files=files, **owner_fields()
        )
        fsync_tree(self.path)
        # the target may have changed since the write started: check it again, right before replacing it
        check_replaceable(self.target, shown=f"{self._argument}={str(self.given)!r}")
        parent = self.target.parent
        self._guard.defer = True  # a SIGTERM now waits until the renames are done
        try:
            old = None
            if self.target.is_dir() and not any(self.target.iterdir()):
                self.target.rmdir()  # an empty folder: nothing to keep
            elif os.path.lexists(self.target):
                old = parent / f"{OLD_PREFIX}{self.token}"
                os.replace(self.target, old)
            try:
                os.replace(self.path, self.target)
            except BaseException:
                if old is not None:
                    os.replace(old, self.target)
                raise
            fsync_dir(parent)
            self._done = True
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            self._guard.defer = False
        self._guard.uninstall()
        if self._guard.pending is not None:
            self._guard.deliver(self._guard.pending)  # the soup is in place; now do what SIGTERM asked
        return self.target

    def abort(self) -> None:
        """Remove the temporary folder (the target is left as it was)."""
        if not self._done:
            self._guard.defer = True
            try:
                shutil.rmtree(self.path, ignore_errors=True)
                self._done = True
            finally:
                self._guard.defer = False
        self._guard.uninstall()

    def __enter__(self) -> AtomicDirectory:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        from .output_dir import Terminated, as_write_error

        if exc_type is not None or not self._done:
            self.abort()
        signum = exc.signum if isinstance(exc, Terminated) else self._guard.pending
        if signum is not None:
            self._guard.deliver(signum)  # cleaned up: now end as SIGTERM would have
        if exc is not None:
            wrapped = as_write_error(exc, self.target, self.path)
            if wrapped is not None:
                raise wrapped from exc


def _write_all(f, data, offset: int) -> None:
    """Write all of `data` at `offset` of the unbuffered file `f` (positional: the file offset is not used)."""
    view = memoryview(data).cast("B")
    fd = f.fileno()
    done = 0
    while done < len(view):
        n = os.pwrite(fd, view[done:], offset + done)
        if n <= 0:  # not expected from a regular file; never loop on it
            raise OSError(errno.EIO, "a write made no progress", f.name)
        done += n


def _name_file(error: OSError, path: Path) -> OSError:
    """Record which file an I/O error happened on (a failed `write` does not say)."""
    if error.filename is None:
        error.filename = str(path)
    return error


class ShardedSafetensorsWriter:
    """Write tensors, in a fixed order, into sharded safetensors files inside `directory`.

    Every shard header is written when the writer is created (the plan gives every name, shape and
    dtype), so every tensor's place in its file is known: tensors are written one by one as they are
    computed, at their offsets (positional writes), and memory never holds a shard. A large tensor may be
    written as slices, from several threads at once ([`write_slice`]).

    Args:
        directory (`Path`):
            Where to write (normally an [`AtomicDirectory`]'s temporary path).
        tensors (`Sequence[tuple[str, tuple[int, ...], torch.dtype]]`):
            Names, shapes and dtypes, in the order in which `write` will be called.
        max_shard_size (`int` or `str`, defaults to `"50GB"`):
            Shard size limit, as in `PreTrainedModel.save_pretrained`.
        metadata (`dict[str, str]`, *optional*):
            Extra `__metadata__` entries (`{"format": "pt"}` is always set).
    """

    def __init__(
        self,
        directory: Path,
        tensors: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
        *,
        max_shard_size: int | str = "50GB",
        metadata: dict[str, str] | None = None,
    ):
        limit = parse_size(max_shard_size)
        self.directory = Path(directory)
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype, int]]] = [[]]
        shard_bytes = 0
        for name, shape, dtype in tensors:
            nbytes = numel(shape) * dtype.itemsize
            if shards[-1] and shard_bytes + nbytes > limit:
                shards.append([])
                shard_bytes = 0
            shards[-1].append((name, tuple(shape), dtype, nbytes))
            shard_bytes += nbytes
        n = len(shards)
        self.filenames = (
            [SAFE_WEIGHTS_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self._slots: dict[str, _Slot] = {}
        self._order = [name for name, _, _ in tensors]
        self._next = 0
        self._slices: dict[int, int] = {}  # the next tensor's slices written so far: start byte -> end byte
        self._partial = 0  # their bytes
        self._lock = threading.Lock()
        self._files = []
        self.total_size = 0
        meta = {"format": "pt", **(metadata or {})}
        for i, shard in enumerate(shards):
            header: dict[str, Any] = {"__metadata__": meta}
            pos = 0
            for name, shape, dtype, nbytes in shard:
                header[name] = {
                    "dtype": dtype_to_safetensors(dtype),
                    "shape": list(shape),
                    "data_offsets": [pos, pos + nbytes],
                }
                pos += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            path = self.directory / self.filenames[i]
            try:
                f = open(path, "wb", buffering=0)
                self._files.append(f)
                _write_all(f, struct.pack("<Q", len(raw)) + raw, 0)
            except OSError as e:
                self.abort()
                raise _name_file(e, path) from None
            start = 8 + len(raw)
            for name, _, dtype, nbytes in shard:
                begin = header[name]["data_offsets"][0]
                self._slots[name] = _Slot(i, start + begin, nbytes, dtype.itemsize)
            self.total_size += pos

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the bytes of `name` whole (it must be the next tensor in the declared order)."""
        with self._lock:
            slot = self._expect(name)
            if self._partial:
                raise SoupError(
                    f"internal error: tensor {name!r} written whole after {self._partial} bytes of it."
                )
            nbytes = tensor.numel() * tensor.element_size()
            if nbytes != slot.nbytes:
                raise SoupError(
                    f"internal error: tensor {name!r} has {nbytes} bytes, {slot.nbytes} were planned."
                )
            self._put(slot, 0, tensor)
            self._next += 1

    def write_slice(self, name: str, start: int, piece: torch.Tensor) -> None:
        """Write elements `start` to `start + piece.numel()` of `name`'s flattened tensor.

        Large tensors are written this way, one cache-sized slice at a time, in any order and from several
        threads at once (positional writes; the slices must not overlap). `name` must be the next tensor in
        the declared order; it counts as written once slices cover it exactly, and only then may the next
        tensor be written.
        """
        with self._lock:
            slot = self._expect(name)
        begin = start * slot.itemsize
        end = begin + piece.numel() * piece.element_size()
        if begin < 0 or end > slot.nbytes:
            raise SoupError(
                f"internal error: bytes {begin}:{end} of tensor {name!r} are outside its {slot.nbytes} planned bytes."
            )
        self._put(slot, begin, piece)
        with self._lock:
            self._expect(name)  # still the tensor being written: a slice after it was complete is an error
            if self._slices.setdefault(begin, end) != end:
                raise SoupError(
                    f"internal error: the slice at byte {begin} of tensor {name!r} was written twice."
                )
            self._partial += end - begin
            if self._partial < slot.nbytes:
                return
            covered = 0
            for b in sorted(self._slices):  # the bytes add up: no gap unless two slices overlap
                if b != covered:
                    raise SoupError(f"internal error: the slices of tensor {name!r} overlap or leave a gap.")
                covered = self._slices[b]
            self._slices.clear()
            self._partial = 0
            self._next += 1

    def _expect(self, name: str) -> _Slot:
        expected = self._order[self._next] if self._next < len(self._order) else None
        if name != expected:
            raise SoupError(f"internal error: tensor {name!r} written out of order (expected {expected!r}).")
        return self._slots[name]

    def _put(self, slot: _Slot, begin: int, tensor: torch.Tensor) -> None:
        """Write `tensor`'s bytes at byte `begin` of `slot` (a positional write: threads may write at once)."""
        if tensor.numel():
            import torch

            t = tensor.contiguous()
            f = self._files[slot.shard]
            try:
                _write_all(f, memoryview(t.view(-1).view(torch.uint8).numpy()), slot.offset + begin)
            except OSError as e:
                raise _name_file(e, Path(f.name)) from None

    def close(self) -> None:
        """Close the files and write the index (sharded output). Checks that every tensor was written."""
        files, self._files = self._files, []
        for i, f in enumerate(files):
            try:
                f.close()
            except OSError as e:
                for rest in files[i + 1 :]:
                    rest.close()
                raise _name_file(e, Path(f.name)) from None
        if self._next != len(self._order):
            raise SoupError(f"internal error: {len(self._order) - self._next} tensors were never written.")
        if len(self.filenames) > 1:
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": {name: self.filenames[self._slots[name].shard] for name in self._order},
            }
            (self.directory / SAFE_WEIGHTS_INDEX_NAME).write_text(
                json.dumps(index, indent=2, sort_keys=True) + "\n"
            )

    def abort(self) -> None:
        files, self._files = self._files, []
        for f in files:
            try:
                f.close()
            except OSError:  # a full disk fails the final flush too; the folder is removed anyway
                pass


# Files copied next to the soup's weights from the reference ingredient.
COMPANION_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
)


def copy_companion_files(
    source: Path,
    directory: Path,
    names: Iterable[str] = COMPANION_FILES,
    skip: Callable[[str], bool] | None = None,
) -> list[str]:
    """Copy config, tokenizer and generation files that exist in `source` into `directory`."""
    copied = []
    for name in names:
        if skip is not None and skip(name):
            continue
        src = source / name
        if src.is_file():
            shutil.copyfile(src, directory / name)
            copied.append(name)
    return copied
