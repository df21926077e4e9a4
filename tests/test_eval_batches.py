"""How eval batches are made and run: longest first (`sort_by_length`), back in the set's order, padding counted;
the evaluation dtype (`eval_dtype`) and mixed precision (`autocast`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset

from hf_soups import merge_models
from hf_soups.errors import InvalidArgumentError
from hf_soups.evaluation import build_evaluator
from tests.synthetic_task import make_split, pretrained_model, tiny_tagger
from tests.tiny_models import make_tiny_llama


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _ragged(n: int, seed: int, low: int = 3) -> tuple[list[list[int]], list[int]]:
    """Examples of lengths `low`..SEQ_LEN in no particular order, with their labels."""
    ids, labels = make_split(n, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    lengths = torch.randint(low, ids.shape[1] + 1, (n,), generator=gen).tolist()
    return [row[:k].tolist() for row, k in zip(ids, lengths)], labels.tolist()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = pretrained_model(seed=3)
    with torch.no_grad():
        m.classifier.weight.mul_(20)
    return m.eval()


def _widths(model, run):
    seen: list[int] = []
    handle = model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(int(kwargs["input_ids"].shape[1])), with_kwargs=True
    )
    try:
        out = run()
    finally:
        handle.remove()
    return seen, out


def test_sorted_batches_run_longest_first_and_come_back_in_order(model):
    rows, labels = _ragged(45, seed=4)
    ds = Dataset.from_dict({"input_ids": rows, "label": labels})
    on = build_evaluator(ds, batch_size=8, model=model)
    off = build_evaluator(ds, batch_size=8, model=model, sort_by_length=False)
    widths, sorted_out = _widths(model, lambda: on.predict(model)["eval"])
    assert widths == sorted(widths, reverse=True) and widths[0] == max(len(r) for r in rows)
    _, plain = _widths(model, lambda: off.predict(model)["eval"])
    # the set's own order: each row is that example's logits alone (an independent batch of one)
    with torch.no_grad():
        alone = np.stack([model(input_ids=torch.tensor([r])).logits[0].numpy() for r in rows])
    np.testing.assert_allclose(sorted_out.logits, alone, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(plain.logits, alone, rtol=1e-4, atol=1e-5)
    assert sorted_out.labels.tolist() == labels == plain.labels.tolist()
    s_on, s_off = on.score({"eval": sorted_out}), off.score({"eval": plain})
    assert s_on["eval"]["accuracy"] == s_off["eval"]["accuracy"]
    assert s_on["eval"]["loss"] == pytest.approx(s_off["eval"]["loss"], rel=1e-6)

    # padding: the positions run, counted independently from the lengths
    lengths = [len(r) for r in rows]

    def positions(seq):
        return sum(max(seq[k : k + 8]) * len(seq[k : k + 8]) for k in range(0, len(seq), 8))

    longest_first = sorted(lengths, key=lambda n: -n)
    info = on.describe_evaluation()
    pad = info["padding"]["eval"]
    assert pad["tokens"] == sum(lengths) and pad["positions"] == positions(longest_first)
    assert pad["padded_fraction"] == round(1 - sum(lengths) / positions(longest_first), 4)
    assert pad["padded_fraction_unsorted"] == round(1 - sum(lengths) / positions(lengths), 4)
    assert pad["padded_fraction"] < pad["padded_fraction_unsorted"]
    assert info["sort_by_length"] is True and info["eval_dtype"] == "auto" and info["autocast"] is None
    assert off.describe_evaluation()["padding"]["eval"]["positions"] == positions(lengths)
    # the batches' make-up is part of the prediction cache key; a set already in order is not "sorted"
    key_on = on.cache_key("eval", model, {"id": "x"})
    assert (
        key_on["sort_by_length"] is True
        and off.cache_key("eval", model, {"id": "x"})["sort_by_length"] is False
    )
    fixed = build_evaluator(Dataset.from_dict({"input_ids": [[2, 5, 6]] * 5, "label": [0] * 5}), model=model)
    assert fixed.cache_key("eval", model, {"id": "x"})["sort_by_length"] is False


def test_token_outputs_and_compute_metrics_come_back_in_order():
    tagger = tiny_tagger(num_labels=3)
    rows, _ = _ragged(23, seed=6)
    gen = torch.Generator().manual_seed(1)
    tags = [torch.randint(0, 3, (len(r),), generator=gen).tolist() for r in rows]
    for t in tags:
        t[0] = -100
    ds = Dataset.from_dict({"input_ids": rows, "labels": tags})
    on = build_evaluator(ds, batch_size=4, model=tagger)
    off = build_evaluator(ds, batch_size=4, model=tagger, sort_by_length=False)
    a, b = on.predict(tagger)["eval"], off.predict(tagger)["eval"]
    flat = [y for t in tags for y in t if y != -100]
    assert a.labels.tolist() == flat == b.labels.tolist()
    np.testing.assert_allclose(a.logits, b.logits, rtol=1e-4, atol=1e-5)

    # compute_metrics sees every example's row in the set's order (padded to the longest)
    seen = {}

    def compute_metrics(pred):
        seen["labels"] = pred.label_ids
        return {"rows": float(len(pred.label_ids))}

    raw = build_evaluator(ds, batch_size=4, model=tagger, compute_metrics=compute_metrics)
    raw.evaluate(tagger)
    width = max(len(r) for r in rows)
    assert seen["labels"].tolist() == [t + [-100] * (width - len(t)) for t in tags]


def test_causal_lm_tokens_come_back_in_order():
    lm = make_tiny_llama(seed=1)
    gen = torch.Generator().manual_seed(3)
    rows = [
        torch.randint(4, 64, (int(n),), generator=gen).tolist()
        for n in torch.randint(3, 20, (17,), generator=gen)
    ]
    ds = Dataset.from_dict({"input_ids": rows})
    on = build_evaluator(ds, metric="accuracy", metric_key="accuracy", batch_size=4, model=lm)
    off = build_evaluator(
        ds, metric="accuracy", metric_key="accuracy", batch_size=4, model=lm, sort_by_length=False
    )
    a, b = on.predict(lm)["eval"], off.predict(lm)["eval"]
    assert a.labels.tolist() == [t for r in rows for t in r[1:]] == b.labels.tolist()
    assert a.preds.tolist() == b.preds.tolist()
    assert a.loss_sum == pytest.approx(b.loss_sum, rel=1e-6) and a.loss_count == b.loss_count


def _ingredients(tmp_path):
    from tests.synthetic_task import add_noise, save, trained_model

    ft = trained_model()
    refs = [str(save(add_noise(ft, 1.5, seed=i), tmp_path / f"good-{i}")) for i in range(3)]
    refs.append(str(save(add_noise(ft, 12.0, seed=99), tmp_path / "ruined")))
    return refs


@pytest.mark.slow
def test_greedy_decisions_do_not_depend_on_sorting_and_bf16_stays_close(tmp_path):
    refs = _ingredients(tmp_path)
    rows, labels = _ragged(160, seed=8, low=4)
    sets = {"val": Dataset.from_dict({"input_ids": rows, "label": labels})}
    common = dict(method="greedy", eval_dataset=sets, batch_size=16, device="cpu", progress=False)
    on = merge_models(refs, **common)
    off = merge_models(refs, **common, sort_by_length=False)
    assert [i.selected for i in on.ingredients] == [i.selected for i in off.ingredients]
    assert [h["kept"] for h in on.history] == [h["kept"] for h in off.history]
    assert [h.get("partial") is not None for h in on.history] == [
        h.get("partial") is not None for h in off.history
    ]
    assert on.scores["val"]["accuracy"] == off.scores["val"]["accuracy"]
    assert on.scores["val"]["loss"] == pytest.approx(off.scores["val"]["loss"], rel=1e-5)
    extra = on.report_extra["evaluation"]
    assert extra["sort_by_length"] is True
    assert extra["padding"]["val"]["padded_fraction"] < extra["padding"]["val"]["padded_fraction_unsorted"]
    assert "Evaluation: batches of 16 longest first, dtype auto; val: " in on.report()

    # evaluated in bfloat16 (weights cast), and under bfloat16 autocast: close to float32, soup.model in float32
    bf16 = merge_models(refs, **common, eval_dtype="bf16")
    assert bf16.report_extra["evaluation"]["eval_dtype"] == "bfloat16"
    assert bf16.scores["val"]["accuracy"] == pytest.approx(on.scores["val"]["accuracy"], abs=0.03)
    assert bf16.scores["val"]["loss"] == pytest.approx(on.scores["val"]["loss"], rel=0.05)
    assert next(bf16.model.parameters()).dtype == torch.float32  # the soup itself keeps the output dtype
    mixed = merge_models(refs, **common, autocast="bfloat16")
    assert mixed.scores["val"]["loss"] == pytest.approx(on.scores["val"]["loss"], rel=0.05)
    assert next(mixed.model.parameters()).dtype == torch.float32


def test_precision_options_are_checked_by_name(model):
    ds = Dataset.from_dict({"input_ids": [[2, 5, 6], [2, 7]], "label": [0, 1]})
    with pytest.raises(InvalidArgumentError, match="eval_dtype"):
        merge_models(["a", "b"], eval_dataset=ds, eval_dtype="int8")
    with pytest.raises(InvalidArgumentError, match="autocast.*bfloat16 or float16"):
        merge_models(["a", "b"], eval_dataset=ds, autocast="float32")
    with pytest.raises(InvalidArgumentError, match="autocast"):
        build_evaluator(ds, autocast="fp8")
    with pytest.raises(InvalidArgumentError, match="sort_by_length"):
        build_evaluator(ds, sort_by_length="yes")
    ev = build_evaluator(ds, model=model, eval_dtype=torch.bfloat16, autocast="bf16", sort_by_length=False)
    assert ev.eval_dtype == "bfloat16"
    key = ev.cache_key("eval", model, {"id": "x"})
    assert key["dtype"] == "torch.bfloat16" and key["autocast"] == "bfloat16"
    live = pretrained_model(seed=3)
    scores = ev.evaluate(live)["eval"]
    assert next(live.parameters()).dtype == torch.bfloat16 and 0.0 <= scores["accuracy"] <= 1.0
