"""Lazy tensor reading and atomic, streamed, sharded safetensors writing.

Reading never maps whole checkpoints into memory: safetensors files are read one tensor at a time with
plain reads into a caller-provided, reused buffer, so the resident memory of a soup does not grow with
the number or the size of the ingredients. Legacy `pytorch_model.bin` files are loaded memory-mapped
with `weights_only=True`; in-memory models are read through their state dict, without copies.

Writing knows every tensor's shape and dtype before the first byte: each shard's header is written
first, then tensor bytes are appended as they are computed, into a temporary directory that is renamed
into place only when everything succeeded.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CorruptCheckpointError, IngredientNotFoundError, SoupError

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
        from .errors import InvalidArgumentError

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
        n = 1
        for d in self.shape:
            n *= d
        return n


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
        header = json.loads(raw)
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
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * itemsize or begin < 0:
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
                begin, end = entry["data_offsets"]
                self._entries[name] = (
                    path,
                    data_start + begin,
                    end - begin,
                    entry["dtype"],
                    tuple(entry["shape"]),
                )
        self._handles: dict[Path, Any] = {}

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
            f = self._handles[path] = open(path, "rb", buffering=0)
        f.seek(offset)
        view = memoryview(raw.numpy())
        got = 0
        while got < nbytes:
            n = f.readinto(view[got:])
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
    """Tensors of legacy `pytorch_model.bin` files, memory-mapped and loaded with `weights_only=True`."""

    def __init__(self, files: Sequence[Path], description: str = ""):
        import pickle
        import zipfile

        import torch

        state: dict[str, torch.Tensor] = {}
        for path in files:
            if not path.exists():
                raise IngredientNotFoundError(f"Weight file {path} does not exist.")
            try:
                loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
                first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise CorruptCheckpointError(
                    f"{path} cannot be loaded as a PyTorch checkpoint ({first_line}). The file is truncated, "
                    "corrupted or not a weights-only state dict: download or save it again (preferably as "
                    "safetensors).",
                    path=str(path),
                ) from None
            if not isinstance(loaded, dict):
                raise CorruptCheckpointError(f"{path} does not hold a state dict.", path=str(path))
            state.update({k: v for k, v in loaded.items() if hasattr(v, "shape")})
        super().__init__(state, description or str(files[0].parent))


@dataclass(frozen=True)
class WeightFiles:
    """The weight files of a checkpoint folder."""

    format: str  # "safetensors" | "bin"
    files: tuple[Path, ...]
    index: Path | None = None


def find_weight_files(folder: Path, prefix: str = "model") -> WeightFiles | None:
    """Locate the weights of a `save_pretrained` folder (sharded or not, safetensors first).

    Returns `None` when the folder holds no known weight file.

    Raises:
        [`CorruptCheckpointError`]: an index file is unreadable.
        [`IngredientNotFoundError`]: an index names a shard that does not exist.
    """
    candidates = [
        ("safetensors", f"{prefix}.safetensors.index.json", f"{prefix}.safetensors"),
        ("bin", WEIGHTS_INDEX_NAME if prefix == "model" else f"{prefix}.bin.index.json", None),
    ]
    for fmt, index_name, single_name in candidates:
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
                raise CorruptCheckpointError(
                    f"{index} is not a valid weight index ({type(e).__name__}: {e}).", path=str(index)
                ) from None
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise IngredientNotFoundError(
                    f"{index} names shard(s) {missing} that are not in {folder}. The download or save is "
                    "incomplete: download or save the checkpoint again."
                )
            return WeightFiles(fmt, tuple(folder / s for s in shards), index)
        if single_name and (folder / single_name).is_file():
            return WeightFiles(fmt, (folder / single_name,))
    if prefix == "model" and (folder / WEIGHTS_NAME).is_file():
        return WeightFiles("bin", (folder / WEIGHTS_NAME,))
    return None


def open_weight_files(weights: WeightFiles, description: str = "") -> TensorSource:
    """Open the weight files found by [`find_weight_files`] as a lazy [`TensorSource`]."""
    if weights.format == "safetensors":
        return SafetensorsSource(weights.files, description)
    return TorchBinSource(weights.files, description)


# --------------------------------------------------------------------------------------------- writing


def parse_size(size: int | str) -> int:
    """`"5GB"` -> 5_000_000_000, `"500MiB"` -> 524_288_000; integers are bytes."""
    if isinstance(size, int):
        return size
    s = str(size).strip().upper()
    units = {
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
    }
    for unit, factor in units.items():
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * factor)
    if s.endswith("B"):
        s = s[:-1]
    try:
        return int(s)
    except ValueError:
        from .errors import InvalidArgumentError

        raise InvalidArgumentError(
            f"max_shard_size={size!r} is not a size such as '5GB' or 500000000."
        ) from None


@dataclass(frozen=True)
class _Slot:
    shard: int
    offset: int  # absolute offset in the shard file
    nbytes: int


class AtomicDirectory:
    """A temporary directory beside `target` that replaces `target` only on [`commit`].

    An exception before `commit` (or `abort`) removes the temporary directory and leaves `target` as it
    was. An existing `target` is replaced only if it is empty or looks like a saved model (it holds a
    `config.json`, weights or an adapter); anything else is refused rather than deleted.
    """

    def __init__(self, target: str | os.PathLike):
        self.target = Path(target).expanduser().absolute()
        if self.target.exists():
            if not self.target.is_dir():
                raise SoupError(f"output_dir {self.target} exists and is not a directory.")
            entries = {p.name for p in self.target.iterdir()}
            model_like = {"config.json", "adapter_config.json", SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME}
            if entries and not (entries & model_like):
                raise SoupError(
                    f"output_dir {self.target} is not empty and does not hold a saved model; refusing to replace "
                    "it. Choose a new or empty directory."
                )
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.path = self.target.parent / f".{self.target.name}.tmp-{uuid.uuid4().hex[:10]}"
        self.path.mkdir()
        self._done = False

    def commit(self) -> Path:
        """Move the finished directory into place; returns the target path."""
        old = None
        if self.target.exists():
            old = self.target.parent / f".{self.target.name}.old-{uuid.uuid4().hex[:10]}"
            os.replace(self.target, old)
        try:
            os.replace(self.path, self.target)
        except BaseException:
            if old is not None:
                os.replace(old, self.target)
            raise
        self._done = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.target

    def abort(self) -> None:
        if not self._done:
            shutil.rmtree(self.path, ignore_errors=True)
            self._done = True

    def __enter__(self) -> AtomicDirectory:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self._done:
            self.abort()


class ShardedSafetensorsWriter:
    """Write tensors, in a fixed order, into sharded safetensors files inside `directory`.

    Every shard header is written when the writer is created (the plan gives every name, shape and
    dtype), so tensors can be appended one by one as they are computed and memory never holds a shard.

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
            numel = 1
            for d in shape:
                numel *= d
            nbytes = numel * dtype.itemsize
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
        self._partial = 0  # bytes of the next tensor already written by write_chunk
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
            f = open(self.directory / self.filenames[i], "wb")
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            start = 8 + len(raw)
            for name, _, _, nbytes in shard:
                begin = header[name]["data_offsets"][0]
                self._slots[name] = _Slot(i, start + begin, nbytes)
            self._files.append(f)
            self.total_size += pos

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the bytes of `name` (must be the next tensor in the declared order)."""
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
        self._append(slot, tensor)
        self._next += 1

    def write_chunk(self, name: str, piece: torch.Tensor) -> None:
        """Append the next consecutive piece of `name`'s flattened bytes.

        Large tensors are written this way, one cache-sized slice at a time; `name` counts as written
        once its planned number of bytes has been appended.
        """
        slot = self._expect(name)
        nbytes = piece.numel() * piece.element_size()
        if self._partial + nbytes > slot.nbytes:
            raise SoupError(
                f"internal error: tensor {name!r} would have {self._partial + nbytes} bytes, "
                f"{slot.nbytes} were planned."
            )
        self._append(slot, piece)
        self._partial += nbytes
        if self._partial == slot.nbytes:
            self._partial = 0
            self._next += 1

    def _expect(self, name: str) -> _Slot:
        expected = self._order[self._next] if self._next < len(self._order) else None
        if name != expected:
            raise SoupError(f"internal error: tensor {name!r} written out of order (expected {expected!r}).")
        return self._slots[name]

    def _append(self, slot: _Slot, tensor: torch.Tensor) -> None:
        if tensor.numel():
            import torch

            t = tensor.contiguous()
            self._files[slot.shard].write(memoryview(t.view(-1).view(torch.uint8).numpy()))

    def close(self) -> None:
        """Close the files and write the index (sharded output). Checks that every tensor was written."""
        for f in self._files:
            f.close()
        self._files = []
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
        for f in self._files:
            f.close()
        self._files = []


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
