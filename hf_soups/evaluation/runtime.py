"""Where models run: the `accelerate` set-up, dataloaders split across processes, padding, gathering.

One [`Runtime`] per evaluator owns an `Accelerator` (so `torchrun` or `accelerate launch` split the batches, and
`gather_for_metrics` drops the padded duplicates of the last batch), the device, and one prepared dataloader per
eval set. Process questions (`is_main_process`, `num_processes`) are the accelerator's, i.e. `PartialState`'s.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .tasks import Collector, Predictions


class PadCollator:
    """Pads a list of examples into tensors without needing a tokenizer.

    `input_ids` are padded with the model's pad token id, `attention_mask` / `token_type_ids` / other sequence
    inputs with 0 and token-level `labels` with -100 (ignored by the loss and the metrics), on the right. An
    attention mask is created when padding was needed and the set had none. For causal language models
    without labels, the labels are the input ids with padding masked out (what
    `DataCollatorForLanguageModeling(mlm=False)` does).
    """

    def __init__(self, pad_token_id: int, causal_labels: bool = False):
        self.pad_token_id = int(pad_token_id)
        self.causal_labels = causal_labels

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        import torch

        batch: dict[str, torch.Tensor] = {}
        lengths = None
        for key in list(examples[0]):
            values = [ex[key] for ex in examples]
            first = values[0]
            if key == "labels" and not isinstance(first, (list, tuple)) and not hasattr(first, "shape"):
                dtype = torch.float32 if any(isinstance(v, float) for v in values) else torch.long
                batch[key] = torch.tensor(values, dtype=dtype)
                continue
            tensors = [torch.as_tensor(v) for v in values]
            if tensors[0].dim() == 0 or all(t.shape == tensors[0].shape for t in tensors):
                batch[key] = torch.stack(tensors)
                if key == "labels" and batch[key].dtype == torch.float64:
                    batch[key] = batch[key].float()
                if key == "input_ids":
                    lengths = torch.tensor([t.shape[0] for t in tensors])
                continue
            pad = {"input_ids": self.pad_token_id, "labels": -100}.get(key, 0)
            width = max(t.shape[0] for t in tensors)
            out = torch.full((len(tensors), width, *tensors[0].shape[1:]), pad, dtype=tensors[0].dtype)
            for i, t in enumerate(tensors):
                out[i, : t.shape[0]] = t
            batch[key] = out
            if key == "input_ids":
                lengths = torch.tensor([t.shape[0] for t in tensors])
        if "input_ids" in batch and "attention_mask" not in batch and lengths is not None:
            width = batch["input_ids"].shape[1]
            if bool((lengths < width).any()):
                batch["attention_mask"] = (torch.arange(width)[None, :] < lengths[:, None]).long()
        if self.causal_labels and "labels" not in batch and "input_ids" in batch:
            labels = batch["input_ids"].clone()
            if "attention_mask" in batch:
                labels[batch["attention_mask"] == 0] = -100
            batch["labels"] = labels
        return batch


#: the batch key carrying each example's index in its eval set (popped before the forward pass)
INDEX_KEY = "__hf_soups_index__"


class OrderedExamples:
    """An eval set's examples read in `order`, each carrying its index in the set under [`INDEX_KEY`]."""

    def __init__(self, examples: list[dict[str, Any]], order: list[int]):
        self.examples = examples
        self.order = order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, k: int) -> dict[str, Any]:
        i = self.order[k]
        return {**self.examples[i], INDEX_KEY: i}


def example_lengths(examples: list[dict[str, Any]]) -> list[int] | None:
    """Each example's token length (`input_ids`), or `None` when the set has none (images, custom inputs)."""
    if not examples or "input_ids" not in examples[0]:
        return None
    lengths = []
    for ex in examples:
        ids = ex.get("input_ids")
        shape = getattr(ids, "shape", None)
        lengths.append(
            int(shape[0]) if shape is not None and len(shape) else len(ids) if ids is not None else 0
        )
    return lengths


def length_order(lengths: list[int] | None) -> list[int] | None:
    """Longest first, ties in the set's order (a stable sort: the same batches every run); `None`: keep the set's order
    (no lengths, one length, or already sorted)."""
    if lengths is None:
        return None
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return None if order == list(range(len(lengths))) else order


def padded_positions(lengths: list[int], batch_size: int, order: list[int] | None = None) -> int:
    """Token positions the model runs over when `lengths` are batched `batch_size` at a time in `order`
    (each batch is padded to its longest example)."""
    seq = [lengths[i] for i in order] if order is not None else lengths
    return sum(
        max(seq[k : k + batch_size]) * len(seq[k : k + batch_size]) for k in range(0, len(seq), batch_size)
    )


def forward_arguments(model: Any) -> set[str] | None:
    """The keyword arguments `model.forward` takes (`None`: it takes anything, pass every column)."""
    forward = getattr(model, "forward", None)
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values()) and "input_ids" not in params:
        return None
    return set(params)


class Runtime:
    """The accelerate side of an evaluator: device, processes, dataloaders and gathering.

    Args:
        device (`str`, *optional*): `"cpu"`, `"cuda"`, `"cuda:1"` ...; default: the accelerate device (CUDA when
            available, else CPU; mps/xpu only when asked for).
        eval_dtype (`str`, *optional*): the dtype models are cast to before they run (`"bfloat16"` ...; they stay
            in it); default: as they are.
        autocast (`str`, *optional*): `"bfloat16"` or `"float16"`: forward passes run under `torch.autocast`.
    """

    def __init__(
        self, device: str | None = None, *, eval_dtype: str | None = None, autocast: str | None = None
    ):
        self.device_request = device
        self.eval_dtype = eval_dtype
        self.autocast = autocast
        self._accelerator = None
        self._device = None
        self._loaders: dict[str, Any] = {}

    @property
    def accelerator(self):
        """The `accelerate.Accelerator` (created on first use)."""
        if self._accelerator is None:
            import torch
            from accelerate import Accelerator

            want_cpu = self.device_request is not None and str(self.device_request).startswith("cpu")
            try:
                acc = Accelerator(cpu=want_cpu)
            except ValueError:  # the accelerate state already lives on a GPU: place tensors ourselves
                acc = Accelerator()
            if self.device_request is not None and acc.num_processes == 1:
                self._device = torch.device(self.device_request)
            elif (
                self.device_request is None
                and acc.num_processes == 1
                and acc.device.type not in ("cuda", "cpu")
            ):
                self._device = torch.device("cpu")  # mps/xpu only when asked for
            else:
                self._device = acc.device
            self._accelerator = acc
        return self._accelerator

    @property
    def device(self) -> torch.device:
        """The torch device models are evaluated on."""
        self.accelerator  # noqa: B018 (sets the device)
        return self._device

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    def all_processes(self, flags: list[bool]) -> list[bool]:
        """Each flag, true only where it is true on every process (one process: as given)."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return list(flags)
        from accelerate.utils import gather_object

        gathered = gather_object([list(flags)])
        return [all(per[i] for per in gathered) for i in range(len(flags))]

    def forget_loaders(self) -> None:
        """Drop the prepared dataloaders (the examples changed)."""
        self._loaders = {}

    def loader(
        self,
        name: str,
        examples: list[dict[str, Any]],
        *,
        batch_size: int,
        collate_fn: PadCollator,
        order: list[int] | None = None,
    ):
        """The dataloader of eval set `name`, prepared by the accelerator (batches split across processes).

        Examples are read in `order` (default: the set's), each with its index in the set under [`INDEX_KEY`], which
        [`run`] hands to the collector so that outputs are put back in the set's order whatever the batches were.
        """
        if name not in self._loaders:
            from torch.utils.data import DataLoader

            dataset = OrderedExamples(examples, order if order is not None else list(range(len(examples))))
            loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
            self._loaders[name] = self.accelerator.prepare(loader, device_placement=[False])
        return self._loaders[name]

    def gather(self, tensors: tuple, pad_dims: tuple, pad_values: tuple | None = None) -> tuple:
        """Pad (along `pad_dims`) across processes, then `gather_for_metrics`; one process: returned as is."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return tensors
        pad_values = pad_values or (0,) * len(tensors)
        prepared = []
        for t, dim, value in zip(tensors, pad_dims, pad_values):
            if t is None:
                prepared.append(None)
                continue
            t = t.to(acc.device)
            if dim is not None:
                t = acc.pad_across_processes(t.contiguous(), dim=dim, pad_index=value)
            prepared.append(t)
        present = [t for t in prepared if t is not None]
        gathered = iter(acc.gather_for_metrics(tuple(present)))
        return tuple(next(gathered) if t is not None else None for t in prepared)

    @contextlib.contextmanager
    def evaluating(self, model: Any) -> Iterator[None]:
        """`model` on the device (in `eval_dtype` when set: it stays so), in eval mode, under `torch.inference_mode()`
        (and `torch.autocast` when asked); training mode restored after."""
        import torch

        device = self.device
        dtype = getattr(torch, self.eval_dtype) if self.eval_dtype is not None else None
        first = next(iter(model.parameters()), None)
        floating = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        if (first.device if first is not None else device) != device or (
            dtype is not None and floating not in (None, dtype)
        ):
            model.to(device=device, dtype=dtype)
        was_training = model.training
        model.eval()
        mixed = (
            torch.autocast(device_type=device.type, dtype=getattr(torch, self.autocast))
            if self.autocast is not None
            else contextlib.nullcontext()
        )
        try:
            with torch.inference_mode(), mixed:
                yield
        finally:
            if was_training:
                model.train()

    def run(
        self,
        model: Any,
        loader: Any,
        collector: Collector,
        *,
        desc: str,
        progress: bool,
        forward: Callable[[dict], torch.Tensor] | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> Predictions:
        """Feed every batch of `loader` to `model` (inside [`evaluating`]) and collect its logits.

        `forward(inputs) -> logits`, when given, replaces `model(**inputs).logits` (a task's own forward, such as
        zero-shot classification's). `stop()`, when given, is asked after each gathered batch: `True` ends the
        pass there (it reads gathered numbers, so every process stops at the same batch) and what was collected
        so far is returned.
        """
        from huggingface_hub.utils import tqdm

        device = self.device
        accepted = forward_arguments(model)
        batches = tqdm(
            loader,
            desc=desc,
            unit="batch",
            leave=False,
            disable=not progress or not self.is_main_process,
            name="hf_soups",
        )
        for batch in batches:
            labels = batch.pop("labels", None)
            index = batch.pop(INDEX_KEY, None)
            inputs = {k: v.to(device) for k, v in batch.items() if accepted is None or k in accepted}
            if forward is not None:
                logits = forward(inputs)
            else:
                output = model(**inputs)
                logits = output.logits if hasattr(output, "logits") else output[0]
            collector.add(logits.float(), labels.to(device) if labels is not None else None)
            if index is not None:
                collector.add_index(index.to(device))
            if stop is not None and stop():
                batches.close()
                end = getattr(
                    loader, "end", None
                )  # accelerate's loader leaves its gradient state only at the end
                if end is not None:
                    end()
                break
        return collector.finish()


__all__ = [
    "INDEX_KEY",
    "OrderedExamples",
    "PadCollator",
    "Runtime",
    "example_lengths",
    "forward_arguments",
    "length_order",
    "padded_positions",
]
