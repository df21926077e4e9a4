"""The streaming engine: every soup is `sum_i c_i * theta_i`, computed one tensor name at a time.

Large tensors are streamed in cache-sized slices when every ingredient can read a slice (safetensors
files, in-memory tensors) and the sink can append one (the sharded writer): each byte is copied once
from the page cache into a small buffer, summed while it is still in the CPU cache and written out, so
memory holds a few small buffers whatever the number and the size of the ingredients. Other tensors
(adapter deltas, permuted classification heads, sinks that need whole tensors) use one float32
accumulator of the largest such tensor and one read buffer. Non-finite values are detected on what is
written: the result cast to the dtype the sink stores (one cheap reduction per slice or tensor, on the
cast the sink makes anyway), so NaN in an ingredient, a float32 overflow and a value too large for the
output dtype (float16 above 65504) are all refused; only then are the ingredients searched for the culprit.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import IncompatibleIngredientsError, NonFiniteTensorError, SoupError
from ..utils import gc_paused, numel, single_threaded

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..merge_ops import TensorRecipe
    from .plan import MergePlan, TensorPlan
    from .sources import ShardedSafetensorsWriter, TensorSource

logger = logging.getLogger(__name__)

# Tensors of more elements than this are streamed in slices of this many elements (a 1 MB float32 accumulator
# slice: large enough that the per-slice Python work is small beside the arithmetic, small enough to stay in a
# core's cache; 2**17 was up to 20% slower on 2 cores). See docs/benchmarks.md.
CHUNK_ELEMENTS = 1 << 18
# Threads that combine the slices of a two-pass method (TIES, DARE, SLERP, Model Stock) side by side, at most
# torch's own thread count (see _SliceRunner).
MIX_WORKERS = 2
# Threads that sum and write the slices of the linear soups (uniform, greedy's candidates written out, WiSE-FT,
# task arithmetic) side by side, at most torch's own thread count.
LINEAR_WORKERS = 2
# The linear soups stream slices of LINEAR_CHUNK_FACTOR * CHUNK_ELEMENTS elements: with the workers writing their
# own slices, half as many slices (half the per-slice Python and thread work) was 5-8% faster on 2 cores for
# 400M x 4 and x 8 bfloat16 (docs/benchmarks.md); the two-pass methods, which hold a slice of every member and
# several work buffers per worker, keep CHUNK_ELEMENTS.
LINEAR_CHUNK_FACTOR = 2
# Distance statistics (compat.DistanceStats) are measured on every STATS_STRIDE-th element of one slice in
# STATS_EVERY of a streamed tensor (its first slice included), and on an evenly strided sample of
# CHUNK_ELEMENTS // STATS_EVERY elements of a tensor read whole.
STATS_EVERY = 128
STATS_STRIDE = 8


class TensorSink:
    """Receives the soup's tensors in plan order.

    The engine first asks [`cast`] for the values exactly as they will be stored, checks that they are
    finite, then hands that result to `write` (or `write_slice`), which then stores it without a second cast.
    Sinks that define `write_slice(plan, start, piece)` receive large tensors as flat slices: from several
    threads at once, in any order within a tensor, every slice of a tensor before the next tensor.
    """

    def cast(
        self, plan: TensorPlan, tensor: torch.Tensor, buffer: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`tensor` (a whole tensor or a flat slice) converted to the dtype in which it will be stored.

        The result may live in a buffer of the sink, valid until the next call; or in `buffer` (uint8, large
        enough) when one is given, so that several threads can cast slices at once.
        """
        return tensor.to(plan.dtype)

    def write(self, plan: TensorPlan, tensor: torch.Tensor) -> None:
        raise NotImplementedError

    def takes_slices(self, plan: TensorPlan) -> bool:
        """Whether `plan`'s tensor may be handed over as slices (`write_slice`): by default, when the sink has one."""
        return hasattr(self, "write_slice")


class WriterSink(TensorSink):
    """Casts each tensor to its planned dtype (through a reused buffer) and appends it to a writer."""

    def __init__(self, writer: ShardedSafetensorsWriter, max_bytes: int):
        import torch

        self.writer = writer
        self._buf = torch.empty(max(max_bytes, 1), dtype=torch.uint8)

    def cast(
        self, plan: TensorPlan, tensor: torch.Tensor, buffer: torch.Tensor | None = None
    ) -> torch.Tensor:
        if tensor.dtype == plan.dtype:
            return tensor
        buf = self._buf if buffer is None else buffer
        out = buf[: tensor.numel() * plan.dtype.itemsize].view(plan.dtype).view(tensor.shape)
        out.copy_(tensor)
        return out

    def write(self, plan: TensorPlan, tensor: torch.Tensor) -> None:
        self.writer.write(plan.name, self.cast(plan, tensor))

    def write_slice(self, plan: TensorPlan, start: int, piece: torch.Tensor) -> None:
        """Write the flat slice of `plan`'s tensor that begins at element `start`.

        Called from several threads: a piece not already cast (see `cast`, with a buffer per thread) is cast into
        a new tensor, never through this sink's one shared buffer.
        """
        self.writer.write_slice(
            plan.name, start, piece if piece.dtype == plan.dtype else piece.to(plan.dtype)
        )


class ModelSink(TensorSink):
    """Copies each tensor into a live model's parameters and buffers, in place.

    Used for in-memory soups and by recipes that evaluate many candidate soups with one model
    (no `from_pretrained` per candidate). Large tensors arrive as flat slices (`write_slice`), copied into their
    place in the parameter (on its device, in its dtype) as they are computed: no whole-tensor float32 result or
    read buffer is held besides the model.
    """

    def __init__(self, model):
        self.model = model
        self._targets = model.state_dict()
        self._missing: list[str] = []
        self._checkpoint_names: dict[str, torch.Tensor] | None = None

    def target(self, name: str) -> torch.Tensor | None:
        """The live tensor a soup tensor goes into: by its name, else by the name transformers saves it under.

        transformers 5 renames some models' tensors between the checkpoint and the live model (its weight
        conversions: ViT's `vit.encoder.layer.0.attention.attention.query.weight` is the live
        `vit.layers.0.attention.q_proj.weight`); the soup's names are the checkpoint's. A renamed tensor is found
        through `revert_weight_conversion` (what `save_pretrained` writes), matched by storage.
        """
        target = self._targets.get(name)
        if target is not None:
            return target
        if self._checkpoint_names is None:
            self._checkpoint_names = {}
            try:
                from transformers.core_model_loading import revert_weight_conversion

                saved = revert_weight_conversion(self.model, dict(self._targets))
            except Exception:  # not a transformers model, or an older transformers
                saved = {}
            live = {(t.data_ptr(), tuple(t.shape)): t for t in self._targets.values()}
            for saved_name, tensor in saved.items():
                match = live.get((tensor.data_ptr(), tuple(tensor.shape)))
                if match is not None and saved_name not in self._targets:
                    self._checkpoint_names[saved_name] = match
        return self._checkpoint_names.get(name)

    def takes_slices(self, plan: TensorPlan) -> bool:
        """Slices of a tensor whose live counterpart is one contiguous block (every parameter `from_pretrained`
        makes); others, and tensors with no counterpart (reported by `finish`), go whole."""
        target = self.target(plan.name)
        return target is not None and target.is_contiguous() and target.numel() == numel(plan.shape)

    def cast(
        self, plan: TensorPlan, tensor: torch.Tensor, buffer: torch.Tensor | None = None
    ) -> torch.Tensor:
        """A whole tensor: copied into the model's own parameter (its dtype and device), which is returned. A
        slice: converted to the parameter's dtype (in `buffer` when given and large enough), not yet written."""
        import torch

        target = self.target(plan.name)
        if target is None:
            return tensor
        if buffer is None and tensor.shape == target.shape:
            with torch.no_grad():
                target.copy_(tensor)
            return target
        if tensor.dtype == target.dtype:
            return tensor
        if buffer is not None and buffer.numel() >= tensor.numel() * target.dtype.itemsize:
            return (
                buffer[: tensor.numel() * target.dtype.itemsize].view(target.dtype).copy_(tensor.reshape(-1))
            )
        return tensor.to(target.dtype)

    def write_slice(self, plan: TensorPlan, start: int, piece: torch.Tensor) -> None:
        """Copy the flat slice that begins at element `start` into its place in the live parameter (called from
        several threads, for disjoint slices; only for tensors `takes_slices` accepted)."""
        import torch

        with torch.no_grad():
            self.target(plan.name).view(-1)[start : start + piece.numel()].copy_(piece.reshape(-1))

    def write(self, plan: TensorPlan, tensor: torch.Tensor) -> None:
        import torch

        target = self.target(plan.name)
        if target is None:
            self._missing.append(plan.name)
            return
        if tensor is not target:
            with torch.no_grad():
                target.copy_(tensor)

    def finish(self) -> None:
        if self._missing:
            raise SoupError(
                f"{len(self._missing)} soup tensors have no counterpart in the live {type(self.model).__name__} "
                f"(e.g. {self._missing[:3]}); the config's 'architectures' does not match the weights. Fix "
                "config.json's architectures field of the first ingredient."
            )


class DictSink(TensorSink):
    """Collects tensors (cast to their planned dtype) in a dict; for small models and tests."""

    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}

    def write(self, plan: TensorPlan, tensor: torch.Tensor) -> None:
        self.tensors[plan.name] = tensor.to(plan.dtype, copy=True)  # the engine reuses its buffers


def read_aligned(
    plan: TensorPlan, index: int, source: TensorSource, buffer: torch.Tensor | None = None
) -> torch.Tensor:
    """Ingredient `index`'s tensor for `plan`, with head rows permuted to the reference label order."""
    t = source.get(plan.source_keys[index], buffer)
    perm = plan.row_permutations[index] if plan.row_permutations else None
    if perm is not None:
        import torch

        t = t.index_select(0, torch.tensor(perm, dtype=torch.long))
    return t


def combine(
    plan: MergePlan,
    sources: Sequence[TensorSource],
    coefficients: Sequence[float],
    sink: TensorSink,
    *,
    progress: bool = True,
    desc: str = "Cooking soup",
    mix: RecipeMix | None = None,
) -> None:
    """Write `sum_i coefficients[i] * ingredient_i` for every tensor of `plan` into `sink`.

    With `mix`, the soup is a non-linear method instead (TIES, DARE, SLERP, Model Stock): see [`RecipeMix`]
    and [`combine_mix`]; `coefficients` then only mark the members that are read (non-zero).

    Floating point tensors are accumulated in float32 and handed to the sink as float32 (sinks cast to the
    planned dtype). Integer and boolean tensors are not averaged: they must be equal in every ingredient
    with a non-zero coefficient, and are copied.

    Args:
        plan ([`MergePlan`]): the aligned plan.
        sources (`Sequence[TensorSource]`): one per ingredient, in plan order.
        coefficients (`Sequence[float]`): one per ingredient; zeros are skipped (never read).
        sink ([`TensorSink`]): where results go.
        progress (`bool`): show a progress bar over tensors (honours `HF_HUB_DISABLE_PROGRESS_BARS`).
        mix ([`RecipeMix`], *optional*): a two-pass method replacing the linear combination.

    Raises:
        [`NonFiniteTensorError`]: an ingredient tensor holds NaN or inf, or the soup's value would be written as
            inf (a float32 overflow, or a value too large for the output dtype, e.g. above 65504 in float16).
        [`IncompatibleIngredientsError`]: an integer buffer differs between ingredients.
    """
    import torch
    from huggingface_hub.utils import tqdm

    if mix is not None:
        combine_mix(plan, sources, mix, sink, progress=progress, desc=desc)
        return
    if len(coefficients) != len(sources):
        raise SoupError(f"internal error: {len(coefficients)} coefficients for {len(sources)} ingredients.")
    active = [(i, float(c)) for i, c in enumerate(coefficients) if c != 0]
    if not active:
        raise SoupError("internal error: every coefficient is zero.")
    streamed = {tp.name for tp in plan.tensors if _streamable(tp, sources, active) and sink.takes_slices(tp)}
    # whole-tensor buffers are sized for the tensors that are not streamed
    max_bytes = max(
        (
            sources[i].info(tp.source_keys[i]).nbytes
            for tp in plan.tensors
            if tp.name not in streamed
            for i, _ in active
        ),
        default=0,
    )
    max_numel = max((numel(t.shape) for t in plan.tensors if t.name not in streamed), default=0)
    read_buf = torch.empty(max(max_bytes, 1), dtype=torch.uint8)
    acc_buf = torch.empty(max(max_numel, 1), dtype=torch.float32)
    wide = torch.empty(max(1, min(max_numel, CHUNK_ELEMENTS)), dtype=torch.float32)  # see _add_scaled
    workers = max(1, min(LINEAR_WORKERS, torch.get_num_threads())) if streamed else 1
    slots: list[_SliceSlot] = []
    if streamed:
        max_itemsize = max(
            sources[i].info(tp.source_keys[i]).dtype.itemsize
            for tp in plan.tensors
            if tp.name in streamed
            for i, _ in active
        )
        slots = [_SliceSlot(max(max_itemsize, 4), _linear_chunk()) for _ in range(workers)]
    # distance statistics (compat.DistanceStats): the members' slices side by side, in float64
    distances = getattr(plan, "distances", None)
    stats = None
    if distances is not None and distances.begin([i for i, _ in active]):
        stats = (distances, torch.empty(len(active), CHUNK_ELEMENTS, dtype=torch.float32))

    with torch.no_grad(), gc_paused(), _SliceRunner(workers) as runner:
        for tp in tqdm(plan.tensors, desc=desc, unit="tensor", disable=not progress, name="hf_soups"):
            if not tp.mergeable:
                sink.write(tp, _copy_checked(tp, sources, active, plan.names))
                continue
            if tp.name in streamed:
                with single_threaded():
                    _combine_slices(tp, sources, active, sink, slots, runner, plan.names, stats=stats)
            elif numel(tp.shape) <= CHUNK_ELEMENTS:
                with single_threaded():
                    _combine_whole(tp, sources, active, sink, acc_buf, read_buf, wide, plan.names, stats)
            else:
                _combine_whole(tp, sources, active, sink, acc_buf, read_buf, wide, plan.names, stats)
    if stats is not None:
        problems = distances.end()
        if plan.report is not None:
            plan.report.problems.extend(problems)
    finish = getattr(sink, "finish", None)
    if finish is not None:
        finish()


@dataclass(frozen=True)
class RecipeMix:
    """A two-pass merge method ([`~hf_soups.merge_ops.TensorRecipe`]) and the members it reads.

    Attributes:
        recipe ([`TensorRecipe`]): the method (its `needs` and element-wise `combine`).
        ingredients (`tuple[int, ...]`): indices (in the plan's members) of θ₁..θ_N, in recipe order (DARE's
            random stream is keyed by the position in this tuple).
        base (`int`, *optional*): index of θ₀ among the members (None when the method takes no base).
    """

    recipe: TensorRecipe
    ingredients: tuple[int, ...]
    base: int | None = None


def combine_mix(
    plan: MergePlan,
    sources: Sequence[TensorSource],
    mix: RecipeMix,
    sink: TensorSink,
    *,
    progress: bool = True,
    desc: str = "Cooking soup",
) -> None:
    """Write a two-pass method's soup for every tensor of `plan` into `sink`.

    Per tensor: pass 1 gathers the statistics `mix.recipe.needs` (magnitude thresholds on each whole task vector,
    one ingredient at a time; Gram matrices over slices), pass 2 calls `mix.recipe.combine` on matching flat slices of
    `CHUNK_ELEMENTS` of the base and of every ingredient. Slices are read with `get_range` when every member can
    (safetensors, in-memory tensors); other members (adapter ingredients, permuted heads) are read whole once per
    tensor. The slices of a tensor are combined by up to `MIX_WORKERS` threads side by side (each kernel on one
    thread, results written in order: see [`_SliceRunner`]), in both passes. Memory beyond the linear engine's:
    N + 1 slice buffers per thread, TIES's bands of candidate magnitudes (see [`_thresholds`]) and one float32
    result of the largest tensor when the sink takes whole tensors (members read whole add one copy each). The
    result is checked for non-finite values after the sink's cast, as the linear path does.

    Raises:
        [`NonFiniteTensorError`], [`IncompatibleIngredientsError`]: as [`combine`].
    """
    import torch
    from huggingface_hub.utils import tqdm

    members = list(mix.ingredients) + ([mix.base] if mix.base is not None else [])
    active = [(i, 1.0) for i in members]
    max_numel = max((numel(t.shape) for t in plan.tensors if t.mergeable), default=0)
    max_itemsize = max(
        (sources[i].info(tp.source_keys[i]).dtype.itemsize for tp in plan.tensors for i in members), default=4
    )
    workers = max(1, min(MIX_WORKERS, torch.get_num_threads()))  # OMP_NUM_THREADS=1: one thread, as asked
    # per worker, the members' slice buffers are the rows of one block: float32 slices of the ingredients are then
    # the rows of one strided array, which the fused kernels take without a copy (merge_ops._as_rows)
    slice_bufs = [
        list(torch.empty(len(members), CHUNK_ELEMENTS * max(max_itemsize, 4), dtype=torch.uint8))
        for _ in range(workers)
    ]
    needs_tau = "thresholds" in mix.recipe.needs
    # one whole float32 task vector when _thresholds needs one (small tensors, a band that missed), grown on demand
    tau_buf: list[torch.Tensor] = []

    def tau(count: int) -> torch.Tensor:
        if not tau_buf or tau_buf[0].numel() < count:
            tau_buf[:] = [torch.empty(max(count, 1), dtype=torch.float32)]
        return tau_buf[0][:count]

    whole_out = None  # allocated when a tensor cannot be written slice by slice

    with torch.no_grad(), gc_paused(), _SliceRunner(workers) as runner:
        for tp in tqdm(plan.tensors, desc=desc, unit="tensor", disable=not progress, name="hf_soups"):
            if not tp.mergeable:
                sink.write(tp, _copy_checked(tp, sources, [(i, 1.0) for i in mix.ingredients], plan.names))
                continue
            n = numel(tp.shape)
            sliced = not any(
                tp.row_permutations and tp.row_permutations[i] is not None for i in members
            ) and all(sources[i].range_readable(tp.source_keys[i]) for i in members)
            wholes = None if sliced else [read_aligned(tp, i, sources[i]).reshape(-1) for i in members]

            def read(
                k: int, start: int, count: int, slot: int = 0, wholes=wholes, tp=tp, buffer=None
            ) -> torch.Tensor:
                """Slice of member `members[k]` in worker `slot`'s buffer (or in `buffer`, a uint8 tensor), valid
                until that worker's next read."""
                if wholes is not None:
                    return wholes[k][start : start + count]
                i = members[k]
                buf = slice_bufs[slot][k] if buffer is None else buffer
                return sources[i].get_range(tp.source_keys[i], start, count, buf)

            write_slices = sliced and n > CHUNK_ELEMENTS and sink.takes_slices(tp)

            with single_threaded():
                stats = _mix_stats(tp, mix, read, n, tau if needs_tau else None, runner)

                def piece(start: int, slot: int, tp=tp, n=n, read=read, stats=stats):
                    """The soup's float32 slice at `start` (its members checked finite), in worker `slot`."""
                    count = min(CHUNK_ELEMENTS, n - start)
                    thetas = [read(k, start, count, slot) for k in range(len(mix.ingredients))]
                    base = read(len(members) - 1, start, count, slot) if mix.base is not None else None
                    for k, t in enumerate(thetas + ([base] if base is not None else [])):
                        if not _finite(t):  # also where the method would drop it (DARE): a broken ingredient
                            _raise_non_finite(
                                tp, sources, [(members[k], 1.0)], plan.names, None, None, t.dtype
                            )
                    return mix.recipe.combine(base, thetas, stats, start).reshape(-1)

                if not write_slices:
                    if whole_out is None or whole_out.numel() < n:
                        whole_out = torch.empty(max(max_numel, 1), dtype=torch.float32)
                    result = whole_out[:n]
                starts = range(0, n, CHUNK_ELEMENTS)
                for start, value in zip(starts, runner.map(piece, starts)):
                    if write_slices:
                        # cast here, in order, not in the workers: the sink casts through one reused buffer
                        out = sink.cast(tp, value)
                        if not _finite(out):
                            _raise_non_finite(tp, sources, active, plan.names, None, value, out.dtype)
                        sink.write_slice(tp, start, out)
                    else:
                        result[start : start + value.numel()] = value
                if not write_slices:
                    acc = result.view(tp.shape)
                    out = sink.cast(tp, acc)
                    if not _finite(out):
                        _raise_non_finite(tp, sources, active, plan.names, None, acc, out.dtype)
                    sink.write(tp, out)
    finish = getattr(sink, "finish", None)
    if finish is not None:
        finish()


class _SliceRunner:
    """Runs `fn(item, slot)` over items on `workers` threads: the slices of one tensor.

    [`map`] (the two-pass methods), results in order: at most `workers` items are in flight and item `j` runs
    in slot `j % workers`, so a slot's buffers are free again when its next item starts. [`drain`] (the linear
    soups), no results: each worker takes items from one shared iterator, with its own slot, until none is left.
    Torch's element-wise kernels release the GIL, so slices of one tensor are combined in parallel while each
    kernel runs on one thread (on cache-sized slices, splitting each kernel across threads costs more than it
    saves). With one worker, everything runs in the calling thread.
    """

    def __init__(self, workers: int):
        self.workers = workers
        self._pool = None

    def __enter__(self) -> _SliceRunner:
        if self.workers > 1:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="hf_soups_slices")
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def map(self, fn, items):
        """`fn(item, slot)` for each item, results in order; item `j` gets slot `j % workers`."""
        slots = self.workers
        if self._pool is None:
            for j, item in enumerate(items):
                yield fn(item, j % slots)
            return
        from collections import deque

        pending = deque()
        todo = iter(enumerate(items))
        for j, item in todo:
            pending.append(self._pool.submit(fn, item, j % slots))
            if len(pending) == self.workers:
                break
        while pending:
            result = pending.popleft().result()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(self._pool.submit(fn, nxt[1], nxt[0] % slots))
            yield result

    def drain(self, fn, items) -> None:
        """`fn(item, slot)` for every item, in no particular order: worker `slot` takes the next item from one
        shared iterator until none is left (no per-item hand-off between threads). Returns when every item is
        done; the first error stops the workers after their current item and is raised.
        """
        todo = iter(items)
        if self._pool is None:
            for item in todo:
                fn(item, 0)
            return
        import threading

        stop = threading.Event()

        def work(slot: int) -> None:
            try:
                for item in todo:  # a range iterator's next() is atomic under the GIL
                    if stop.is_set():
                        return
                    fn(item, slot)
            except BaseException:
                stop.set()
                raise

        futures = [self._pool.submit(work, slot) for slot in range(self.workers)]
        try:
            for future in futures:
                future.result()
        except BaseException:  # an error or an interrupt: let the other workers stop early
            stop.set()
            raise


def _mix_stats(tp: TensorPlan, mix: RecipeMix, read, n: int, tau, runner: _SliceRunner):
    """Pass 1 of [`combine_mix`] for one tensor: the [`TensorStats`] its recipe needs."""
    import torch

    from ..merge_ops import GramAccumulator, TensorStats, _task_vector

    recipe = mix.recipe
    stats = TensorStats(name=tp.name, numel=n)
    n_ing = len(mix.ingredients)
    base_k = n_ing  # position of the base among the members read
    starts = range(0, n, CHUNK_ELEMENTS)
    if tau is not None:
        stats.thresholds = _thresholds(mix, read, n, tau, runner)
    if recipe.needs & {"task_gram", "weight_gram"}:
        acc = GramAccumulator(n_ing)
        task = "task_gram" in recipe.needs

        def vectors(start: int, slot: int):
            count = min(CHUNK_ELEMENTS, n - start)
            base = read(base_k, start, count, slot) if task else None
            rows = [read(k, start, count, slot) for k in range(n_ing)]
            if count % acc.CHUNK == 0:
                # whole 1024-element chunks (every slice but a tensor's last): their dot products, in this worker
                return acc.chunk_dots(rows, base)
            return [_task_vector(v, base) if task else v.to(torch.float32, copy=True) for v in rows]

        for part in runner.map(vectors, starts):
            if isinstance(part, list):
                acc.add(part)
            else:
                acc.add_chunk_dots(part)
        stats.gram = acc.result()
    return stats


# The joint threshold pass samples SAMPLE_RUNS runs of contiguous elements of each task vector (see _thresholds):
# runs of SAMPLE_RUN elements, 32,768 magnitudes, which bracket the threshold in a band of about 2% of the tensor
# (twice as many made TIES slower: sorting the sample cost more than the narrower band saved); longer runs for
# tensors of over 128 x 32,768 elements (embeddings), so that their bands, held until the scan ends, stay small
# (the band narrows as the square root of the sample grows).
SAMPLE_RUNS = 32
SAMPLE_RUN = 1024
SAMPLE_SHARE = 128


def _sample_run(n: int) -> int:
    """Elements per run of the threshold sample of an n-element tensor: at least 1/SAMPLE_SHARE of it in all."""
    return max(SAMPLE_RUN, n // (SAMPLE_RUNS * SAMPLE_SHARE))


def _thresholds(mix: RecipeMix, read, n: int, tau, runner: _SliceRunner) -> list:
    """TIES's per-ingredient [`MagnitudeThreshold`]s of one tensor (pass 1 of [`combine_mix`]), exact.

    Large tensors: every ingredient's band of candidate magnitudes is bracketed from a sample of `SAMPLE_RUNS`
    runs of its task vector, then one pass over the slices reads the base and every ingredient once and scans
    each task vector's slice for its band ([`merge_ops.band_scan`]); memory: the bands (a few % of the tensor per
    ingredient). An ingredient whose band missed, and small tensors, take the whole task vector in `tau()` (one
    float32 copy of the tensor, one ingredient at a time) and [`merge_ops.magnitude_threshold`].
    """
    import torch

    from ..merge_ops import band_scan, magnitude_band, magnitude_threshold, threshold_in_band

    density = mix.recipe.params["density"]
    n_ing = len(mix.ingredients)
    base_k = n_ing
    k_keep = int(density * n)
    found: list = [None] * n_ing
    run = _sample_run(n)
    if n > 8 * SAMPLE_RUNS * run and k_keep > 0:  # a tensor well beyond its sample
        # each member's runs read straight into one buffer, then widened and subtracted by one kernel per member
        # (a few hundred small reads per tensor: per-call overheads, not bytes, are their cost)
        raw = torch.empty(n_ing + 1, SAMPLE_RUNS * run * 8, dtype=torch.uint8)

        def member_runs(k: int) -> torch.Tensor:
            size = 8 * run  # bytes per run until the first read tells the member's element size
            for r in range(SAMPLE_RUNS):
                place = raw[k, r * size : (r + 1) * size]
                t = read(k, r * (n - run) // (SAMPLE_RUNS - 1), run, buffer=place)
                if t.data_ptr() != place.data_ptr():  # a member read whole: copy its run into place
                    place[: t.numel() * t.element_size()].copy_(t.reshape(-1).view(torch.uint8))
                size, dtype = run * t.element_size(), t.dtype  # run 0 sits at 0 whatever `size` was
            return raw[k, : SAMPLE_RUNS * size].view(dtype).view(SAMPLE_RUNS, run).to(torch.float32)

        base = member_runs(base_k)
        sample = torch.stack([member_runs(k).sub_(base) for k in range(n_ing)])
        del raw, base
        bits = sample.view(torch.int32).bitwise_and_(0x7FFFFFFF)
        # per ingredient, on the workers (torch's sorts release the GIL)
        bands = list(
            runner.map(
                lambda k, _: magnitude_band(bits[k].reshape(-1), k_keep, n, runs=SAMPLE_RUNS), range(n_ing)
            )
        )

        def scan(start: int, slot: int) -> list:
            count = min(CHUNK_ELEMENTS, n - start)
            base = read(base_k, start, count, slot)
            return [
                band_scan(read(k, start, count, slot), lo, hi, start, base)
                for k, (lo, hi) in enumerate(bands)
            ]

        scans = list(runner.map(scan, range(0, n, CHUNK_ELEMENTS)))
        found = list(
            runner.map(
                lambda k, _: threshold_in_band(k_keep, [per_slice[k] for per_slice in scans]), range(n_ing)
            )
        )
        del scans
    for k in range(n_ing):
        if found[k] is not None:
            continue
        whole = tau(n)

        def fill(start: int, slot: int, k=k, whole=whole) -> None:
            count = min(CHUNK_ELEMENTS, n - start)
            piece = whole[start : start + count]
            _task_vector_into(piece, read(k, start, count, slot), read(base_k, start, count, slot))

        for _ in runner.map(fill, range(0, n, CHUNK_ELEMENTS)):
            pass
        found[k] = magnitude_threshold(whole, density, map_blocks=runner.map)
    return found


def _task_vector_into(out: torch.Tensor, theta: torch.Tensor, base: torch.Tensor) -> None:
    """`out` = θ − θ₀ in float32, the bits of `merge_ops._task_vector` (narrower floats widened first)."""
    import torch

    if theta.dtype == base.dtype == torch.float32:
        torch.sub(theta, base, out=out)  # one kernel
    else:
        out.copy_(theta)
        out.sub_(base)


def _streamable(tp: TensorPlan, sources: Sequence[TensorSource], active) -> bool:
    """Whether `tp` can be combined slice by slice: large, no head-row permutation, slices readable."""
    if numel(tp.shape) <= CHUNK_ELEMENTS:
        return False
    if any(tp.row_permutations and tp.row_permutations[i] is not None for i, _ in active):
        return False
    return all(sources[i].range_readable(tp.source_keys[i]) for i, _ in active)


def _combine_whole(tp: TensorPlan, sources, active, sink, acc_buf, read_buf, wide, names, stats=None) -> None:
    """`sum_i c_i * ingredient_i` for one tensor read whole (`wide`: see [`_add_scaled`])."""
    import torch

    n = numel(tp.shape)
    acc = acc_buf[:n].view(tp.shape)
    stride = -(-n // (max(1, CHUNK_ELEMENTS // STATS_EVERY)))  # distance statistics: an evenly strided sample
    first = True
    for k, (i, c) in enumerate(active):
        t = read_aligned(tp, i, sources[i], read_buf)
        if stats is not None:
            sampled = t.reshape(-1)[::stride]
            stats[1][k, : sampled.numel()].copy_(sampled)
        if first:
            if t.dtype == torch.float32:
                torch.mul(t, c, out=acc)
            else:
                acc.copy_(t)
                if c != 1.0:
                    acc.mul_(c)
            first = False
        else:
            _add_scaled(acc.view(-1), t.reshape(-1), c, wide)
    out = sink.cast(tp, acc)
    if not _finite(out):
        _raise_non_finite(tp, sources, active, names, read_buf, acc, out.dtype)
    if stats is not None:
        m = -(-n // stride)
        stats[0].add(tp.name, stats[1][:, :m], n)
    sink.write(tp, out)


def _add_scaled(acc: torch.Tensor, t: torch.Tensor, c: float, wide: torch.Tensor) -> None:
    """`acc += c * t` for a flat float32 `acc` and a flat `t`. A reduced-precision `t` is first widened into `wide`
    (a float32 buffer), one slice of its size at a time: `acc.add_(t)` would allocate a float32 copy of the whole
    of `t` per call (for a bfloat16 embedding of 500M elements, 2 GB on top of the accumulator; for the slice
    workers, one per slice, which grew glibc's heaps)."""
    if t.dtype.itemsize == 4:  # float32 (no import on the slice workers' path)
        acc.add_(t, alpha=c)
        return
    step = wide.numel()
    for start in range(0, t.numel(), step):
        piece = t[start : start + step]
        acc[start : start + piece.numel()].add_(wide[: piece.numel()].copy_(piece), alpha=c)


def _linear_chunk() -> int:
    """Elements per slice of the linear soups (see `LINEAR_CHUNK_FACTOR`)."""
    return LINEAR_CHUNK_FACTOR * CHUNK_ELEMENTS


class _SliceSlot:
    """One worker's buffers for the linear slice path, for slices of `chunk` elements: a float32 accumulator
    slice, a read buffer, a widened copy of a reduced-precision slice, a cast buffer."""

    def __init__(self, itemsize: int, chunk: int):
        import torch

        self.acc = torch.empty(chunk, dtype=torch.float32)
        self.read = torch.empty(chunk * itemsize, dtype=torch.uint8)
        self.wide = torch.empty(chunk, dtype=torch.float32)
        self.out = torch.empty(chunk * 4, dtype=torch.uint8)
        self.sample: torch.Tensor | None = None  # the members' slices for distance statistics, when measured


def _combine_slices(
    tp: TensorPlan, sources, active, sink, slots, runner, names, check: bool = True, stats=None
) -> None:
    """`sum_i c_i * ingredient_i` for one large tensor, one slice (of the slots' size) at a time.

    The slices are summed, cast, checked and written by `runner`'s workers side by side, each taking the next
    slice as it finishes one, in its own [`_SliceSlot`] (the sink's `write_slice` takes slices in any order,
    from several threads): reads from the page cache, the arithmetic and the writes overlap (file reads and
    writes and torch's kernels release the GIL), with no hand-off per slice. The distance statistics' sampled
    slices are reduced to Gram matrices by the workers and added in slice order by the calling thread (the
    same float64 sums whatever the threads' timing). `check=False` skips the finiteness check (only for
    measuring a result already known to be refused).
    """
    import torch

    keys = [tp.source_keys[i] for i, _ in active]
    first_i, first_c = active[0]
    first_is_f32 = sources[first_i].info(keys[0]).dtype == torch.float32
    total = numel(tp.shape)
    chunk = slots[0].acc.numel()
    starts = range(0, total, chunk)
    # the sampled slices' Gram matrices, filled by the workers, added in slice order at the end
    grams = {} if stats is None else dict.fromkeys(starts[::STATS_EVERY])

    def one(start: int, slot_index: int):
        slot = slots[slot_index]
        count = min(chunk, total - start)
        acc = slot.acc[:count]
        # the first ingredient is read straight into the accumulator when it is float32
        t = sources[first_i].get_range(
            keys[0], start, count, slot.acc.view(torch.uint8) if first_is_f32 else slot.read
        )
        sample = None
        if start in grams:
            if slot.sample is None:
                slot.sample = torch.empty_like(stats[1])
            sample = slot.sample
            sample[0, : -(-count // STATS_STRIDE)].copy_(t[::STATS_STRIDE])
        if t.data_ptr() == acc.data_ptr():
            if first_c != 1.0:
                acc.mul_(first_c)
        elif t.dtype == torch.float32:
            torch.mul(t, first_c, out=acc)
        else:  # widen first: torch.mul of a bfloat16 slice would round its product to bfloat16
            acc.copy_(t)
            if first_c != 1.0:
                acc.mul_(first_c)
        for k, ((i, c), key) in enumerate(zip(active[1:], keys[1:]), start=1):
            piece = sources[i].get_range(key, start, count, slot.read)
            if sample is not None:
                sample[k, : -(-count // STATS_STRIDE)].copy_(piece[::STATS_STRIDE])
            _add_scaled(acc, piece, c, slot.wide)
        out = sink.cast(tp, acc, slot.out)
        if check and not _finite(out):
            _raise_non_finite(tp, sources, active, names, None, None, out.dtype)
        sink.write_slice(tp, start, out)
        if sample is not None:
            rows = sample[:, : -(-count // STATS_STRIDE)]
            grams[start] = (stats[0].slice_gram(rows), rows.shape[1])

    runner.drain(one, starts)
    for start in sorted(grams):
        stats[0].add_gram(tp.name, *grams[start], numel=total)


def _finite(t: torch.Tensor) -> bool:
    """Whether every value of `t` is finite, with one sum: a NaN or an inf makes any sum non-finite.

    The sum in `t`'s dtype is the fast path; when it overflows (a float16 slice whose values add up past
    65504), a float64 sum, which finite values cannot overflow, decides.
    """
    import torch

    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t.sum(dtype=torch.float64)))


def _copy_checked(tp: TensorPlan, sources, active, names) -> torch.Tensor:
    import torch

    first_i = active[0][0]
    ref = read_aligned(tp, first_i, sources[first_i]).clone()
    for i, _ in active[1:]:
        other = read_aligned(tp, i, sources[i])
        if not torch.equal(ref, other):
            raise IncompatibleIngredientsError(
                f"Integer/boolean tensor {tp.name!r} differs between {names[first_i]!r} and {names[i]!r}; such "
                "buffers (position ids, counters) cannot be averaged and must be equal. Re-save the ingredients from "
                "the same base model.",
                ingredient=names[i],
                tensor_name=tp.name,
            )
    return ref


class _MaxMagnitudeSink(TensorSink):
    """Keeps the largest magnitude of the float32 values it receives (for the overflow message)."""

    def __init__(self):
        self.max = 0.0

    def cast(
        self, plan: TensorPlan, tensor: torch.Tensor, buffer: torch.Tensor | None = None
    ) -> torch.Tensor:
        return tensor

    def write(self, plan: TensorPlan, tensor: torch.Tensor) -> None:
        if tensor.numel():
            self.max = max(self.max, float(tensor.abs().max()))

    def write_slice(self, plan: TensorPlan, start: int, piece: torch.Tensor) -> None:
        self.write(plan, piece)  # called from one thread (see `_raise_non_finite`)


def _raise_non_finite(tp: TensorPlan, sources, active, names, buf, acc, dtype) -> None:
    """Name the cause of a non-finite result: an ingredient, the float32 sum, or the cast to `dtype`.

    `acc` is the whole float32 result when the caller has it (None for sliced tensors, which are re-read).
    """
    import torch

    for i, _ in active:
        t = read_aligned(tp, i, sources[i], buf)
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise NonFiniteTensorError(
                f"Ingredient {names[i]!r} has {bad} NaN/inf value(s) in tensor {tp.name!r}. The checkpoint is "
                "broken (diverged training or a bad save): leave it out of the soup.",
                ingredient=names[i],
                tensor_name=tp.name,
            )
    if acc is None:  # a sliced tensor: sum it again, slice by slice, keeping only the largest magnitude
        probe = _MaxMagnitudeSink()
        slots = [_SliceSlot(8, _linear_chunk())]
        _combine_slices(tp, sources, active, probe, slots, _SliceRunner(1), names, check=False)
        magnitude = probe.max
    else:
        magnitude = float(acc.abs().max())
    if (
        dtype != torch.float32
        and dtype.is_floating_point
        and magnitude == magnitude
        and magnitude != float("inf")
    ):
        limit = torch.finfo(dtype).max
        dtype_name = str(dtype).removeprefix("torch.")
        raise NonFiniteTensorError(
            f"Tensor {tp.name!r} of the soup has values of magnitude up to {magnitude:.6g}, beyond the largest "
            f"{dtype_name} ({limit:.6g}): written as {dtype_name} they would be inf. Use a wider output dtype, "
            "such as dtype='bfloat16' or dtype='float32'.",
            tensor_name=tp.name,
        )
    raise NonFiniteTensorError(
        f"Tensor {tp.name!r} overflowed while averaging (every ingredient is finite but the float32 sum is not).",
        tensor_name=tp.name,
    )
