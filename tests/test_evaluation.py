"""Held-out evaluation (hf_soups.evaluation): tasks, inputs, metrics, and the checks made before any work."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from datasets import Dataset

from hf_soups.errors import EvaluationError, InvalidArgumentError
from hf_soups.evaluation import build_evaluator, infer_task
from tests.synthetic_task import (
    as_dataset,
    ids_to_text,
    make_split,
    pretrained_model,
    tiny_config,
    tiny_tagger,
    tiny_tokenizer,
)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # bundled metrics, no network attempt


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = pretrained_model(seed=3)
    with torch.no_grad():  # make predictions less one-sided than a fresh init
        m.classifier.weight.mul_(20)
    return m


@pytest.fixture(scope="module")
def data():
    ids, labels = make_split(203, seed=1)  # not a multiple of any batch size used below
    return ids, labels


def _manual_scores(model, ids, labels):
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    acc = float((logits.argmax(-1) == labels).float().mean())
    loss = float(torch.nn.functional.cross_entropy(logits, labels))
    return acc, loss, logits.argmax(-1)


def test_sequence_classification_matches_manual_computation(model, data):
    ids, labels = data
    ood_ids, ood_labels = make_split(57, seed=2, shift=0.2)
    evaluator = build_evaluator(
        {"val": as_dataset(ids, labels), "ood": as_dataset(ood_ids, ood_labels, label_name="labels")},
        batch_size=16,
        device="cpu",
    )
    scores = evaluator.evaluate(model)
    assert list(scores) == ["val", "ood"]
    for name, (x, y) in {"val": (ids, labels), "ood": (ood_ids, ood_labels)}.items():
        acc, loss, _ = _manual_scores(model, x, y)
        assert scores[name]["accuracy"] == pytest.approx(acc)
        assert scores[name]["loss"] == pytest.approx(loss, rel=1e-4)
    assert evaluator.select_on == "val" and evaluator.metric_key == "accuracy" and evaluator.greater_is_better
    assert evaluator.primary(scores) == scores["val"]["accuracy"]
    assert evaluator.task == "classification" and evaluator.problem_type == "single_label_classification"
    assert len(evaluator.timings) == 1 and evaluator.timings[0] > 0


def test_scores_do_not_depend_on_batch_size_or_padding(model, data):
    ids, labels = data
    # variable lengths: padding must not change predictions (attention mask built by the collator)
    rows = [row[: 4 + (i % 6)].tolist() for i, row in enumerate(ids)]
    ds = Dataset.from_dict({"input_ids": rows, "label": labels.tolist()})
    one = build_evaluator(ds, batch_size=1, metric="f1").evaluate(model)
    many = build_evaluator(ds, batch_size=7, metric="f1").evaluate(model)
    assert one["eval"]["f1"] == pytest.approx(many["eval"]["f1"])
    assert one["eval"]["loss"] == pytest.approx(many["eval"]["loss"], rel=1e-4)
    with torch.no_grad():
        preds = [int(model(input_ids=torch.tensor([r])).logits.argmax(-1)) for r in rows]
    from sklearn.metrics import f1_score

    assert one["eval"]["f1"] == pytest.approx(f1_score(labels.tolist(), preds))


def test_raw_text_is_tokenized_with_the_given_tokenizer(model, data, tmp_path):
    ids, labels = data
    tok = tiny_tokenizer()
    texts = ids_to_text(ids)
    raw = Dataset.from_dict({"text": texts, "label": labels.tolist()})
    enc = tok(texts)
    pre = Dataset.from_dict(
        {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "label": labels.tolist()}
    )
    from_raw = build_evaluator(raw, tokenizer=tok, config=model.config.to_dict()).evaluate(model)
    from_pre = build_evaluator(pre).evaluate(model)
    assert from_raw["eval"] == pytest.approx(from_pre["eval"])
    # a tokenizer folder works too, and so does a sentence pair column set
    tok.save_pretrained(tmp_path / "tok")
    pair = Dataset.from_dict({"premise": texts, "hypothesis": texts[::-1], "label": labels.tolist()})
    evaluator = build_evaluator(pair, tokenizer=str(tmp_path / "tok"), model=model)
    assert evaluator.text_columns is None  # guessed from the GLUE-style names
    pair_enc = tok(texts, texts[::-1])
    with torch.no_grad():
        first = model(**{k: torch.tensor([v[0]]) for k, v in pair_enc.items()}).logits.argmax(-1)
    assert "accuracy" in evaluator.evaluate(model)["eval"]
    assert evaluator._examples["eval"][0]["input_ids"] == pair_enc["input_ids"][0]
    assert int(first) in (0, 1)


def test_raw_text_without_any_tokenizer_is_a_clear_error(model, data):
    ids, labels = data
    raw = Dataset.from_dict({"sentence": ids_to_text(ids), "label": labels.tolist()})
    with pytest.raises(EvaluationError, match="tokenizer="):
        build_evaluator(raw, config=model.config.to_dict())
    with pytest.raises(EvaluationError, match="text_columns"):
        build_evaluator(Dataset.from_dict({"body": ["a"], "label": [0]}), config=model.config.to_dict())


def test_multi_label_classification():
    from sklearn.metrics import f1_score
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    config = tiny_config(num_labels=4)
    config.problem_type = "multi_label_classification"
    model = BertForSequenceClassification(config).eval()
    ids, _ = make_split(64, seed=5)
    targets = (torch.rand(64, 4, generator=torch.Generator().manual_seed(1)) < 0.4).float()
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "labels": targets.tolist()})
    evaluator = build_evaluator(ds, metric="f1", batch_size=10, model=model)
    assert evaluator.problem_type == "multi_label_classification"
    scores = evaluator.evaluate(model)["eval"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    preds = (logits > 0).int().numpy()
    assert scores["f1"] == pytest.approx(
        f1_score(targets.int().numpy(), preds, average="macro", zero_division=0)
    )
    expected_loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
    assert scores["loss"] == pytest.approx(float(expected_loss), rel=1e-4)


def test_regression_scored_with_pearson_and_accuracy_refused():
    from scipy.stats import pearsonr
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_config(num_labels=1)).eval()
    ids, _ = make_split(50, seed=6)
    targets = torch.linspace(0, 5, 50)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "label": targets.tolist()})
    cfg = model.config.to_dict()
    assert infer_task(cfg)[1] == "regression"
    evaluator = build_evaluator(ds, metric="pearsonr", config=cfg)
    scores = evaluator.evaluate(model)["eval"]
    with torch.no_grad():
        preds = model(input_ids=ids).logits[:, 0]
    assert scores["pearsonr"] == pytest.approx(pearsonr(targets.numpy(), preds.numpy())[0], rel=1e-4)
    assert scores["loss"] == pytest.approx(float(torch.nn.functional.mse_loss(preds, targets)), rel=1e-4)
    with pytest.raises(EvaluationError, match="regression"):
        build_evaluator(ds, metric="accuracy", config=cfg)
    # the pre-bind check guesses regression from float labels too
    with pytest.raises(EvaluationError, match="dry run|regression"):
        build_evaluator(Dataset.from_dict({"input_ids": [[2, 5]], "label": [0.5]}), metric="accuracy")


def test_token_classification_ignores_minus_100_and_aligns_words():
    model = tiny_tagger(num_labels=3)
    ids, _ = make_split(30, seed=7)
    gen = torch.Generator().manual_seed(2)
    tags = torch.randint(0, 3, ids.shape, generator=gen)
    tags[:, 0] = -100
    rows = [r[: 5 + i % 5].tolist() for i, r in enumerate(ids)]
    tag_rows = [t[: 5 + i % 5].tolist() for i, t in enumerate(tags)]
    ds = Dataset.from_dict({"input_ids": rows, "labels": tag_rows})
    evaluator = build_evaluator(ds, batch_size=4, model=model)
    assert evaluator.task == "token-classification"
    scores = evaluator.evaluate(model)["eval"]
    hits = total = 0
    with torch.no_grad():
        for r, t in zip(rows, tag_rows):
            pred = model(input_ids=torch.tensor([r])).logits.argmax(-1)[0]
            for p, y in zip(pred.tolist(), t):
                if y != -100:
                    hits += int(p == y)
                    total += 1
    assert scores["accuracy"] == pytest.approx(hits / total)

    # raw pre-split words: the first sub-token of each word carries its tag, the rest are ignored
    words = [[f"w{int(t) - 5}" for t in r[1:]] for r in rows]
    word_tags = [t[1:] for t in tag_rows]
    raw = Dataset.from_dict({"tokens": words, "ner_tags": word_tags})
    evaluator = build_evaluator(raw, label_column="ner_tags", tokenizer=tiny_tokenizer(), model=model)
    example = evaluator._examples["eval"][0]
    assert example["labels"] == [-100, *word_tags[0], -100]  # [CLS] words [SEP]
    assert 0.0 <= evaluator.evaluate(model)["eval"]["accuracy"] <= 1.0


def test_causal_lm_perplexity_is_exp_of_token_loss():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=2, n_positions=32, pad_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    rows = [list(range(5, 5 + n)) for n in (6, 9, 4, 12, 7)]
    ds = Dataset.from_dict({"input_ids": rows})  # no labels: the inputs are the targets
    evaluator = build_evaluator(ds, metric=None, batch_size=2, model=model)
    assert evaluator.task == "causal-lm" and evaluator.metric_key == "perplexity"
    assert not evaluator.greater_is_better
    scores = evaluator.evaluate(model)["eval"]
    total = count = 0.0
    with torch.no_grad():
        for r in rows:
            x = torch.tensor([r])
            loss = model(input_ids=x, labels=x).loss
            total += float(loss) * (len(r) - 1)
            count += len(r) - 1
    assert scores["loss"] == pytest.approx(total / count, rel=1e-4)
    assert scores["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)
    assert evaluator.better(2.0, 3.0) and not evaluator.better(3.0, 2.0)
    # raw text, no labels, task unknown until the ingredients are bound (the merge_models order)
    raw = Dataset.from_dict({"text": ["w0 w1 w2 w3", "w4 w5 w6", "w7 w8 w9 w10 w11"]})
    late = build_evaluator(raw, metric="perplexity", tokenizer=tiny_tokenizer())
    late.bind(config=config.to_dict() | {"architectures": ["GPT2LMHeadModel"]}, model=model)
    assert late.task == "causal-lm" and late.evaluate(model)["eval"]["perplexity"] > 1
    with pytest.raises(EvaluationError, match="metric='perplexity'"):
        build_evaluator(raw, metric="accuracy")  # accuracy needs labels: refused before any model is known
    # no metric: the task's default, chosen when the model is known: perplexity for a language model...
    default = build_evaluator(raw, tokenizer=tiny_tokenizer())
    assert default.metric_name == "the task's default metric"  # not chosen before the model is known
    default.bind(config=config.to_dict() | {"architectures": ["GPT2LMHeadModel"]}, model=model)
    assert default.metric_name == "perplexity" and default.metric_key == "perplexity"
    assert not default.greater_is_better
    assert default.evaluate(model)["eval"]["perplexity"] == late.evaluate(model)["eval"]["perplexity"]
    # ...and accuracy for any other model, which needs labels
    classifier = tiny_config()
    classifier.architectures = ["BertForSequenceClassification"]
    with pytest.raises(EvaluationError, match="no labels"):
        build_evaluator(raw, tokenizer=tiny_tokenizer()).bind(config=classifier.to_dict())
    # token accuracy with an evaluate metric, as the transformers language-modelling examples do
    acc = build_evaluator(ds, metric="accuracy", model=model).evaluate(model)["eval"]
    assert set(acc) == {"accuracy", "loss", "perplexity"} and 0 <= acc["accuracy"] <= 1


def test_masked_lm_masks_once_and_deterministically():
    from transformers import BertForMaskedLM

    torch.manual_seed(0)
    config = tiny_config()
    config.architectures = ["BertForMaskedLM"]
    model = BertForMaskedLM(config).eval()
    ids, _ = make_split(40, seed=8)
    ds = Dataset.from_dict({"text": ids_to_text(ids)})
    evaluator = build_evaluator(ds, metric="perplexity", tokenizer=tiny_tokenizer(), model=model)
    masked = [ex["labels"] for ex in evaluator._examples["eval"]]
    n_masked = sum(sum(1 for v in row if v != -100) for row in masked)
    assert 0 < n_masked < sum(len(r) for r in masked) * 0.4
    first = evaluator.evaluate(model)
    assert evaluator.evaluate(model) == first
    again = build_evaluator(ds, metric="perplexity", tokenizer=tiny_tokenizer(), model=model)
    assert again.evaluate(model) == first


def test_compute_metrics_trainer_style(model, data):
    ids, labels = data
    seen = {}

    def compute_metrics(eval_pred):
        logits, label_ids = eval_pred
        seen["shape"] = logits.shape
        return {"acc": float((logits.argmax(-1) == label_ids).mean()), "n": len(label_ids)}

    evaluator = build_evaluator(
        as_dataset(ids, labels), compute_metrics=compute_metrics, metric_key="eval_acc"
    )
    scores = evaluator.evaluate(model)["eval"]
    assert seen["shape"] == (len(ids), 2)
    assert evaluator.metric_key == "acc"
    assert scores["acc"] == pytest.approx(_manual_scores(model, ids, labels)[0]) and scores["n"] == len(ids)
    with pytest.raises(EvaluationError, match="metric_key='f1'"):
        build_evaluator(as_dataset(ids, labels), compute_metrics=compute_metrics, metric_key="f1")


def test_metric_forms_callable_and_combined(model, data):
    import evaluate

    from hf_soups.evaluation.metrics import bundled_metric_path

    ids, labels = data
    acc = _manual_scores(model, ids, labels)[0]

    def hits(predictions, references):
        return sum(int(p == r) for p, r in zip(predictions, references))

    ev = build_evaluator(as_dataset(ids, labels), metric=hits)
    assert ev.evaluate(model)["eval"]["hits"] == round(acc * len(ids))
    combined = evaluate.combine([str(bundled_metric_path("accuracy")), str(bundled_metric_path("recall"))])
    ev = build_evaluator(as_dataset(ids, labels), metric=combined, metric_key="recall")
    scores = ev.evaluate(model)["eval"]
    assert scores["accuracy"] == pytest.approx(acc) and "recall" in scores and ev.metric_key == "recall"
    loss_ev = build_evaluator(as_dataset(ids, labels), metric="loss")
    assert loss_ev.metric_key == "loss" and not loss_ev.greater_is_better
    assert list(loss_ev.evaluate(model)["eval"]) == ["loss"]


def test_multiclass_f1_defaults_to_macro_average(data):
    from sklearn.metrics import f1_score
    from transformers import BertForSequenceClassification

    torch.manual_seed(1)
    model = BertForSequenceClassification(tiny_config(num_labels=3)).eval()
    ids, _ = data
    labels = torch.arange(len(ids)) % 3
    ev = build_evaluator(as_dataset(ids, labels), metric="f1", model=model)
    with torch.no_grad():
        preds = model(input_ids=ids).logits.argmax(-1)
    assert ev.evaluate(model)["eval"]["f1"] == pytest.approx(f1_score(labels, preds, average="macro"))
    with pytest.raises(EvaluationError, match="dry run"):
        build_evaluator(
            as_dataset(ids, labels), metric="f1", metric_kwargs={"average": "binary"}, model=model
        )


def test_string_labels_are_mapped_with_label2id(model, data):
    ids, labels = data
    cfg = model.config.to_dict()
    cfg["label2id"] = {"neg": 0, "pos": 1}
    names = ["neg", "pos"]
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "label": [names[i] for i in labels.tolist()]})
    scores = build_evaluator(ds, config=cfg).evaluate(model)
    assert scores["eval"]["accuracy"] == pytest.approx(_manual_scores(model, ids, labels)[0])
    bad = Dataset.from_dict({"input_ids": ids[:2].tolist(), "label": ["neg", "maybe"]})
    with pytest.raises(EvaluationError, match="maybe"):
        build_evaluator(bad, config=cfg)


@pytest.mark.parametrize(
    "kwargs, dataset, match",
    [
        ({}, None, "No eval_dataset"),
        ({}, {}, "empty dict"),
        ({}, Dataset.from_dict({"input_ids": [], "label": []}), "empty"),
        ({"metric": "accuracy"}, Dataset.from_dict({"text": ["a b"]}), "no labels"),
        (
            {"label_column": "gold"},
            Dataset.from_dict({"input_ids": [[2]], "label": [0]}),
            "no label column 'gold'",
        ),
        (
            {"select_on": "test"},
            {"val": Dataset.from_dict({"input_ids": [[2]], "label": [0]})},
            "select_on='test'",
        ),
        (
            {"metric": "no_such_metric_xyz", "trust_remote_code": True},  # trusted, but not loadable offline
            Dataset.from_dict({"input_ids": [[2]], "label": [0]}),
            "no_such_metric",
        ),
        ({"metric_key": "f2"}, Dataset.from_dict({"input_ids": [[2]], "label": [0]}), "metric_key='f2'"),
    ],
)
def test_bad_input_is_refused_up_front(kwargs, dataset, match):
    with pytest.raises(EvaluationError, match=match):
        build_evaluator(dataset, **kwargs)


def test_unlabelled_and_out_of_range_labels(model):
    cfg = model.config.to_dict()
    test_split = Dataset.from_dict({"input_ids": [[2, 5], [2, 6]], "label": [-1, -1]})
    with pytest.raises(EvaluationError, match="test split"):
        build_evaluator(test_split, config=cfg)
    with pytest.raises(EvaluationError, match="outside the model's 2 classes"):
        build_evaluator(Dataset.from_dict({"input_ids": [[2, 5]], "label": [7]}), config=cfg)
    with pytest.raises(InvalidArgumentError):
        build_evaluator(Dataset.from_dict({"input_ids": [[2]], "label": [0]}), batch_size=0)
    with pytest.raises(EvaluationError, match="compute_metrics"):
        build_evaluator(
            Dataset.from_dict({"input_ids": [[2]], "label": [0]}), config={"architectures": ["Foo"]}
        )


def test_merge_models_checks_evaluation_before_touching_ingredients(tmp_path):
    from hf_soups import merge_models

    ds = Dataset.from_dict({"input_ids": [[2, 5]], "label": [0]})
    missing = [str(tmp_path / "does-not-exist")] * 2
    with pytest.raises(InvalidArgumentError, match="no_such_metric"):
        merge_models(missing, method="greedy", eval_dataset=ds, metric="no_such_metric")
    with pytest.raises(EvaluationError, match="metric_key"):
        merge_models(missing, method="greedy", eval_dataset=ds, metric_key="bleu")
    with pytest.raises(EvaluationError, match="no labels"):
        merge_models(missing, method="greedy", eval_dataset=Dataset.from_dict({"text": ["x"]}), metric="f1")
    with pytest.raises(InvalidArgumentError, match="eval_dataset"):
        merge_models(missing, method="greedy")


def test_better_handles_direction_strictness_and_nan(data):
    ids, labels = data
    ev = build_evaluator(as_dataset(ids, labels))
    assert ev.better(0.9, 0.9) and not ev.better(0.9, 0.9, strict=True)
    assert ev.better(0.91, 0.9, strict=True) and not ev.better(0.89, 0.9)
    assert not ev.better(float("nan"), 0.1) and ev.better(0.1, float("nan")) and ev.better(0.1, None)
    assert sorted([0.5, float("nan"), 0.9], key=ev.sort_key)[:2] == [0.9, 0.5]
    low = build_evaluator(as_dataset(ids, labels), metric="accuracy", greater_is_better=False)
    assert low.better(0.1, 0.2) and not low.better(0.3, 0.2)


def test_infer_task():
    assert infer_task({"architectures": ["LlamaForCausalLM"]}) == ("causal-lm", None)
    assert infer_task({"architectures": ["GPT2LMHeadModel"]}) == ("causal-lm", None)
    assert infer_task({"architectures": ["RobertaForMaskedLM"]}) == ("masked-lm", None)
    assert infer_task({"architectures": ["ViTForImageClassification"], "id2label": {"0": "a", "1": "b"}}) == (
        "classification",
        None,
    )
    assert infer_task({"architectures": ["BertForSequenceClassification"], "problem_type": "regression"})[
        1
    ] == ("regression")
    assert infer_task({"architectures": ["T5ForConditionalGeneration"]}) == (None, None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(model, data):
    ids, labels = data
    cpu = build_evaluator(as_dataset(ids, labels), device="cpu").evaluate(model)
    gpu = build_evaluator(as_dataset(ids, labels), device="cuda").evaluate(model)
    assert gpu["eval"]["accuracy"] == pytest.approx(cpu["eval"]["accuracy"])
    assert np.isclose(gpu["eval"]["loss"], cpu["eval"]["loss"], rtol=1e-3)


# ---------------------------------------------------------------------------------------- inputs that crash models


def _token_models():
    from transformers import BertForTokenClassification, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    token_config = tiny_config(3)
    token_config.architectures = ["BertForTokenClassification"]
    gpt2 = GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=2, n_positions=32)
    gpt2.architectures = ["GPT2LMHeadModel"]
    return BertForTokenClassification(token_config).eval(), GPT2LMHeadModel(gpt2).eval()


def test_token_ids_beyond_the_vocabulary_are_named_before_the_model_runs(model, monkeypatch):
    """A set tokenized with another tokenizer: an EvaluationError with the set, column, id, size and fix."""
    calls = []
    monkeypatch.setattr(type(model), "forward", lambda self, *a, **k: calls.append(1))
    ds = Dataset.from_dict({"input_ids": [[2, 5, 150], [2, 7, 3]], "label": [0, 1]})
    with pytest.raises(EvaluationError) as info:
        build_evaluator({"val": ds}, model=model)  # bound to the config: refused at once
    message = str(info.value)
    for text in ("'val'", "'input_ids'", "150", "vocab_size is 99", "tokenizer"):
        assert text in message, (text, message)
    # a config without vocab_size: the model's own embedding rows decide, still before any forward pass
    evaluator = build_evaluator({"val": ds}, config={"architectures": ["BertForSequenceClassification"]})
    with pytest.raises(EvaluationError, match=r"'input_ids' holds ids up to 150, but the model's embeddings"):
        evaluator.evaluate(model)
    with pytest.raises(EvaluationError, match="negative id -1"):
        build_evaluator(Dataset.from_dict({"input_ids": [[2, -1]], "label": [0]}), model=model)
    assert calls == []


@pytest.mark.parametrize(
    "which, columns, match",
    [
        ("cls", {"input_ids": [[2] * 40, [2, 7]], "label": [0, 1]}, "40 tokens, more than the 32 positions"),
        (
            "cls",
            {"input_ids": [[2, 5], [2, 7]], "token_type_ids": [[0, 5], [0, 0]], "label": [0, 1]},
            "type_vocab",
        ),
        ("cls", {"input_ids": [[2, 5], [2, 7]], "label": [0.5, 1.0]}, "not class ids"),
        ("cls", {"input_ids": [[2, 5], [2, 7]], "label": [[0, 1, 1], [1, 0, 0]]}, "model has 2 labels"),
        ("cls", {"input_ids": [[2, 5], [2, 7]], "label": [0, None]}, r"examples \[1\] have no label"),
        ("cls", {"input_ids": [[], [2, 7]], "label": [0, 1]}, "example 0 has no input_ids"),
        (
            "tok",
            {"input_ids": [[2, 5, 6], [2, 7, 8]], "labels": [[0, 7, 1], [1, 2, -100]]},
            r"\[7\], outside",
        ),
        (
            "tok",
            {"input_ids": [[2, 5, 6], [2, 7, 8]], "labels": [[0, 1], [1, 2, 0]]},
            "2 labels for 3 tokens",
        ),
        ("lm", {"input_ids": [[2, 5, 150], [2, 7, 3]]}, "ids up to 150"),
        ("lm", {"input_ids": [[2, 5, 6], [2, 7, 3]], "labels": [[2, 5, 600], [2, 7, 3]]}, r"\[600\]"),
        ("lm", {"input_ids": [[5] * 40, [2, 7, 3]]}, "40 tokens, more than the 32 positions"),
    ],
)
def test_inputs_that_would_crash_the_model_are_named_errors(model, which, columns, match):
    """Each of these raised a raw IndexError / RuntimeError / TypeError from torch (or scored silently)."""
    token_model, lm = _token_models()
    target = {"cls": model, "tok": token_model, "lm": lm}[which]
    kwargs = {"metric": "perplexity"} if which == "lm" else {}
    with pytest.raises(EvaluationError, match=match) as info:
        evaluator = build_evaluator(
            {"val": Dataset.from_dict(columns)}, model=target, progress=False, **kwargs
        )
        evaluator.evaluate(target)
    assert "'val'" in str(info.value)


# ---------------------------------------------------------------------------------------- package structure


def test_importing_the_evaluation_package_loads_no_heavy_library():
    """`build_evaluator` and every evaluation module are importable without torch / transformers / evaluate."""
    import subprocess
    import sys

    heavy = ("torch", "transformers", "evaluate", "accelerate", "datasets")
    code = (
        "import sys, hf_soups.evaluation, hf_soups.evaluation.tasks, hf_soups.evaluation.runtime; "
        f"loaded = [m for m in {heavy!r} if m in sys.modules]; assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_task_registry_names_every_task_once():
    from hf_soups.evaluation import TASKS
    from hf_soups.evaluation.tasks import TASK_CLASSES, Task, make_task

    assert TASKS == (
        "classification",
        "zero-shot-classification",
        "token-classification",
        "causal-lm",
        "masked-lm",
        "custom",
    )
    for name in TASKS:
        task = make_task(name, num_labels=3)
        assert isinstance(task, Task) and task.name == name == TASK_CLASSES[name].name
    ds = Dataset.from_dict({"input_ids": [[2, 5]], "label": [0]})
    with pytest.raises(InvalidArgumentError, match="causal-lm"):
        build_evaluator(ds, task="summarization")


def test_merge_models_scores_language_models_on_perplexity_by_default(tmp_path, tiny_bert_dirs):
    """No `metric=`: a greedy soup of causal LMs on raw text is chosen on held-out perplexity (lower is better, as
    docs/language-models.md says), each candidate's score equal to `exp` of the model's own mean token loss; an
    unlabelled set for a classifier is refused (its default, accuracy, needs labels) before any tensor is read."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from hf_soups import merge_models
    from tests.tiny_models import make_tiny_llama_dir

    dirs = [make_tiny_llama_dir(tmp_path / f"lm-{i}", seed=i) for i in range(3)]
    held_out = Dataset.from_dict({"text": ["user : w1 w2 w3 <eos>", "assistant : w4 w5 w6 w7 w8 <eos>"] * 4})
    soup = merge_models([str(d) for d in dirs], method="greedy", eval_dataset=held_out, progress=False)
    assert soup.metric_key == "perplexity"
    singles = {i.name: i.score for i in soup.ingredients}
    assert all(i.scores["eval"]["perplexity"] == i.score for i in soup.ingredients)
    best = min(singles, key=singles.get)  # the lowest perplexity starts the soup and is kept
    assert next(i for i in soup.ingredients if i.name == best).selected
    assert soup.score <= singles[best]  # greedy keeps only what does not raise the perplexity
    card = str(soup.model_card())
    assert "kept when adding it does not raise the held-out perplexity" in card
    tokenizer = AutoTokenizer.from_pretrained(dirs[0])
    total = count = 0.0
    model = LlamaForCausalLM.from_pretrained(dirs[0]).eval()
    with torch.no_grad():
        for text in held_out["text"]:
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            total += float(model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    assert singles[dirs[0].name] == pytest.approx(math.exp(total / count), rel=1e-4)
    with pytest.raises(EvaluationError, match="no labels"):
        merge_models(
            tiny_bert_dirs, method="greedy", eval_dataset=Dataset.from_dict({"text": ["x y"]}), progress=False
        )
    assert not (tmp_path / "soup").exists()
