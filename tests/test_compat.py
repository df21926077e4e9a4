"""The one compatibility checker: merge_models and inspect agree, and the rules of the reliability issue."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import save_file

from hf_soups import IncompatibleIngredientsError, merge_models
from hf_soups.cli.inspect import inspect_models, plan_merge
from hf_soups.errors import SoupError
from hf_soups.publishing.recipe_file import RecipeFile
from tests.testing_common import read_safetensors as _state
from tests.tiny_models import make_tiny_bert, make_tiny_bert_dir


def _resave(src, dst, edit_state=None, edit_config=None):
    shutil.copytree(src, dst)
    if edit_state is not None:
        sd = _state(dst)
        edit_state(sd)
        save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    if edit_config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _vocab(order: int) -> str:
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"tok{i}" for i in range(94)]
    if order:
        tokens = tokens[:5] + tokens[5:][::-1]
    return "\n".join(tokens) + "\n"


def _set(key, value):
    return lambda cfg: cfg.__setitem__(key, value)


def _labels(names):
    def edit(cfg):
        cfg["id2label"] = {str(i): n for i, n in enumerate(names)}
        cfg["label2id"] = {n: i for i, n in enumerate(names)}

    return edit


def _nan(sd):
    sd["bert.encoder.layer.1.output.dense.weight"][0, 0] = float("nan")


def _counter(value):
    return lambda sd: sd.__setitem__("counter", torch.tensor([1, 2, value]))


# Each case: (name, how to make the odd ingredient from ft-1, whether merge_models and inspect must refuse).
CASES = {
    "deeper": (lambda t, d: make_tiny_bert_dir(t / "odd", seed=1, num_hidden_layers=3), True),
    "shape-only": (
        lambda t, d: _resave(
            make_tiny_bert_dir(t / "w", seed=1, intermediate_size=40),
            t / "odd",
            None,
            _set("intermediate_size", 37),
        ),
        True,
    ),
    "vocab-size": (lambda t, d: make_tiny_bert_dir(t / "odd", seed=1, vocab_size=101), True),
    "missing-tensor": (
        lambda t, d: _resave(d[1], t / "odd", lambda sd: sd.pop("bert.pooler.dense.bias")),
        True,
    ),
    "extra-tensor": (
        lambda t, d: _resave(d[1], t / "odd", lambda sd: sd.__setitem__("extra.weight", torch.ones(2))),
        True,
    ),
    "other-labels": (lambda t, d: _resave(d[1], t / "odd", None, _labels(["pos", "neg", "neutral"])), True),
    "architecture-class": (
        lambda t, d: _resave(d[1], t / "odd", None, _set("architectures", ["BertForTokenClassification"])),
        True,
    ),
    "integer-vs-float": (
        lambda t, d: _resave(
            d[1],
            t / "odd",
            lambda sd: sd.__setitem__("bert.pooler.dense.bias", torch.zeros(32, dtype=torch.int64)),
        ),
        True,
    ),
    "nan": (lambda t, d: _resave(d[1], t / "odd", _nan), True),
    "label-order": (lambda t, d: _label_permuted(t), False),
    "wrapper-prefix": (
        lambda t, d: _resave(
            d[1], t / "odd", lambda sd: [sd.__setitem__(f"module.{k}", sd.pop(k)) for k in list(sd)]
        ),
        False,
    ),
    "same-twice": (lambda t, d: d[0], False),
}


def _label_permuted(tmp_path):
    model = make_tiny_bert(seed=1)
    perm = [2, 0, 1]
    with torch.no_grad():
        model.classifier.weight.copy_(model.classifier.weight[perm].clone())
        model.classifier.bias.copy_(model.classifier.bias[perm].clone())
    model.config.id2label = {i: f"L{p}" for i, p in enumerate(perm)}
    model.config.label2id = {v: k for k, v in model.config.id2label.items()}
    model.save_pretrained(tmp_path / "odd")
    return tmp_path / "odd"


@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_models_and_inspect_agree(case, tmp_path, tiny_bert_dirs):
    make, refused = CASES[case]
    odd = make(tmp_path, tiny_bert_dirs)
    models = [tiny_bert_dirs[0], odd]
    report = inspect_models(models, progress=False)
    error = None
    try:
        merge_models(models, progress=False)
    except SoupError as e:
        error = e
    assert (error is not None) == refused == (not report.compatible), (error, report.problems)
    # --dry-run runs the same checker on what is on disk (streaming-time checks, NaN and buffers, excepted)
    recipe = RecipeFile.from_dict(
        {"ingredients": [str(m) for m in models], "output_dir": str(tmp_path / "soup")},
        base_dir=str(tmp_path),
        source="test",
    )
    planned = plan_merge(recipe)
    assert planned.compatibility_checked
    static = [p.message for p in report.findings if p.fatal and p.check not in ("non-finite",)]
    if case != "nan":
        assert planned.problems == static
    assert not (tmp_path / "soup").exists()
    if refused:
        first = next(p for p in report.findings if p.fatal)
        assert first.ingredient == error.ingredient
        assert first.tensor_name == error.tensor_name
        assert str(error) in report.problems  # the very message merge_models raises is in the report


def test_every_problem_is_listed_at_once(tmp_path, tiny_bert_dirs):
    five = make_tiny_bert_dir(tmp_path / "five-labels", seed=1, num_labels=5)
    big = make_tiny_bert_dir(tmp_path / "big-vocab", seed=2, vocab_size=120)
    report = inspect_models([tiny_bert_dirs[0], five, big], progress=False)
    checks = {(p.check, p.ingredient) for p in report.findings if p.fatal}
    assert ("labels", "five-labels") in checks and ("vocab", "big-vocab") in checks
    assert ("tensors", "five-labels") in checks and ("tensors", "big-vocab") in checks
    with pytest.raises(IncompatibleIngredientsError) as e:
        merge_models([tiny_bert_dirs[0], five, big], progress=False)
    assert str(e.value) == report.problems[0]


# ------------------------------------------------------------------------------------------ defect 4: labels


def test_repeated_label_that_needs_aligning_is_refused(tmp_path, tiny_bert_dirs):
    a = _resave(tiny_bert_dirs[0], tmp_path / "a", None, _labels(["x", "x", "y"]))
    b = _resave(tiny_bert_dirs[1], tmp_path / "b", None, _labels(["x", "y", "x"]))
    # before: the permutation [0, 0, 1] took b's row 0 twice and dropped its row 2, silently
    with pytest.raises(IncompatibleIngredientsError) as e:
        merge_models([a, b], progress=False)
    assert "'x'" in str(e.value) and "id2label" in str(e.value) and e.value.ingredient == "b"
    assert not inspect_models([a, b], progress=False).compatible
    # the same repeated map in every ingredient needs no alignment: averaged row by row
    c = _resave(tiny_bert_dirs[2], tmp_path / "c", None, _labels(["x", "x", "y"]))
    merge_models([a, c], progress=False)


# ------------------------------------------------------------------------------------------ defect 9: tied embeddings


def _llama_pair(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    def make(tie, seed):
        cfg = LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            tie_word_embeddings=tie,
        )
        torch.manual_seed(0)  # one "pre-trained" init ...
        model = LlamaForCausalLM(cfg)
        gen = torch.Generator().manual_seed(seed)  # ... fine-tuned differently
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.01)
        path = tmp_path / ("tied" if tie else "untied")
        model.save_pretrained(path)
        return path

    return make(True, 1), make(False, 2)


def test_tied_and_untied_ingredients_soup_the_same_in_either_order(tmp_path, caplog):
    tied, untied = _llama_pair(tmp_path)
    t, u = _state(tied), _state(untied)
    assert "lm_head.weight" not in t and "lm_head.weight" in u
    caplog.set_level(logging.WARNING, logger="hf_soups")
    # before: [tied, untied] was refused ("has 1 tensor(s) that 'tied' lacks") and [untied, tied] accepted
    one = merge_models([tied, untied], output_dir=tmp_path / "one", progress=False)
    two = merge_models([untied, tied], output_dir=tmp_path / "two", progress=False)
    a, b = _state(one.output_dir), _state(two.output_dir)
    assert a.keys() == b.keys() == u.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    # the tied ingredient contributes its input embeddings as its lm_head
    expected = (t["model.embed_tokens.weight"].double() + u["lm_head.weight"].double()) / 2
    torch.testing.assert_close(a["lm_head.weight"].double(), expected, rtol=0, atol=1e-6)
    for folder in (one.output_dir, two.output_dir):
        assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is False
    assert "tie_word_embeddings" in caplog.text
    # in memory too (the live model of a tied reference is untied before the soup is written into it)
    live = merge_models([tied, untied], progress=False).model
    torch.testing.assert_close(live.lm_head.weight.double(), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(
        live.model.embed_tokens.weight.double(),
        (t["model.embed_tokens.weight"].double() + u["model.embed_tokens.weight"].double()) / 2,
        rtol=0,
        atol=1e-6,
    )
    # and inspect agrees: compatible, with the same explanation
    report = inspect_models([tied, untied], progress=False)
    assert report.compatible and any("tie_word_embeddings" in w for w in report.warnings)


def test_untied_ingredient_without_its_head_names_tie_word_embeddings(tmp_path):
    tied, untied = _llama_pair(tmp_path)
    broken = _resave(untied, tmp_path / "broken", lambda sd: sd.pop("lm_head.weight"))
    with pytest.raises(IncompatibleIngredientsError, match="tie_word_embeddings") as e:
        merge_models([untied, broken], progress=False)
    assert e.value.ingredient == "broken" and e.value.tensor_name == "lm_head.weight"


# ------------------------------------------------------------------------------------------ defect 11: tokenizers


def test_different_tokenizers_of_the_same_size_are_refused(tmp_path, tiny_bert_dirs, caplog):
    a = _resave(tiny_bert_dirs[0], tmp_path / "a")
    b = _resave(tiny_bert_dirs[1], tmp_path / "b")
    (a / "vocab.txt").write_text(_vocab(0))
    (b / "vocab.txt").write_text(_vocab(1))
    # before: averaged silently (same vocab_size, so nothing looked wrong)
    with pytest.raises(IncompatibleIngredientsError, match="different tokenizers") as e:
        merge_models([a, b], progress=False)
    assert "'a'" in str(e.value) and "'b'" in str(e.value) and e.value.ingredient == "b"
    assert not inspect_models([a, b], progress=False).compatible
    (b / "vocab.txt").write_text(_vocab(0))
    merge_models([a, b], progress=False)
    # absent for one ingredient: a loud warning, the soup is made
    (b / "vocab.txt").unlink()
    caplog.set_level(logging.WARNING, logger="hf_soups")
    merge_models([a, b], progress=False)
    assert "No tokenizer files for 'b'" in caplog.text


# ------------------------------------------------------------------------------------------ defect 16: twice


def test_the_same_ingredient_twice_is_flagged(tmp_path, tiny_bert_dirs, caplog):
    caplog.set_level(logging.WARNING, logger="hf_soups")
    merge_models([tiny_bert_dirs[0], tiny_bert_dirs[1], tiny_bert_dirs[0]], progress=False)
    assert "counted twice" in caplog.text and "doubles its weight" in caplog.text
    caplog.clear()
    model = make_tiny_bert(seed=3)
    merge_models([model, model], progress=False)
    assert "the same object" in caplog.text
    caplog.clear()
    merge_models(tiny_bert_dirs[:2], progress=False)
    assert "counted twice" not in caplog.text
    report = inspect_models([tiny_bert_dirs[0], tiny_bert_dirs[0]], progress=False)
    assert report.compatible and any(p.check == "duplicate" for p in report.findings)


# ------------------------------------------------------------------------------------------ defect 14: one basin


def _relative_distance(a, b):
    """Per tensor ||a - b|| / ((||a|| + ||b||) / 2), averaged weighted by size, in float64 (independent of hf_soups)."""
    sa, sb = _state(a), _state(b)
    total = weight = 0.0
    for k in sa:
        if not sa[k].is_floating_point():
            continue
        x, y = sa[k].double(), sb[k].double()
        na, nb = float(x.norm()), float(y.norm())
        if na + nb > 0:
            total += x.numel() * float((x - y).norm()) / ((na + nb) / 2)
            weight += x.numel()
    return total / weight


def test_independently_initialised_models_are_flagged_fine_tunes_are_not(tmp_path, tiny_bert_dirs, caplog):
    caplog.set_level(logging.WARNING, logger="hf_soups")
    merge_models(tiny_bert_dirs, output_dir=tmp_path / "ok", progress=False)
    assert "independently initialised" not in caplog.text
    report = inspect_models(tiny_bert_dirs, progress=False)
    assert not report.independent and "Compatible: these models can be souped together." in report.format()
    assert report.relative_distances[0][1] == pytest.approx(
        _relative_distance(tiny_bert_dirs[0], tiny_bert_dirs[1]), rel=1e-9
    )

    strangers = [make_tiny_bert_dir(tmp_path / f"init-{s}", seed=0, base_seed=s) for s in (11, 12)]
    # before: averaged into noise without a word, and inspect said "Compatible"
    merge_models(strangers, output_dir=tmp_path / "noise", progress=False)
    assert "look independently initialised" in caplog.text
    report = inspect_models(strangers, progress=False)
    figure = _relative_distance(*strangers)
    assert figure > 1.0
    assert report.relative_distances[0][1] == pytest.approx(figure, rel=1e-9)
    text = report.format()
    assert "these look independently initialised: a soup of them will not work" in text
    assert f"{figure:.2f}" in text


def test_distances_gathered_while_streaming_match_float64(tmp_path, monkeypatch):
    """Large tensors are measured on a sample while merging (one slice in 8 streamed, or a strided sample)."""
    from hf_soups.core import engine
    from hf_soups.core.engine import DictSink, TensorSink, combine
    from hf_soups.core.plan import build_plan
    from hf_soups.ingredients import Ingredient, resolve

    dirs = [make_tiny_bert_dir(tmp_path / f"m{i}", seed=i, vocab_size=5000) for i in range(2)]
    dirs.append(make_tiny_bert_dir(tmp_path / "far", seed=0, base_seed=77, vocab_size=5000))
    big = "bert.embeddings.word_embeddings.weight"
    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 1 << 17)  # the embedding spans two slices
    assert _state(dirs[0])[big].numel() > engine.CHUNK_ELEMENTS
    resolved = [resolve(Ingredient(d)) for d in dirs]

    class Discard(TensorSink):  # a sink that can take slices, as the sharded writer does
        def write(self, plan, tensor):
            pass

        def write_slice(self, plan, start, piece):
            pass

    sds = [_state(d) for d in dirs]
    for sink in (Discard(), DictSink()):  # slices streamed, or tensors read whole
        plan = build_plan(resolved)
        combine(plan, [r.open() for r in resolved], [1 / 3] * 3, sink, progress=False)
        g = plan.distances.tensor_gram(big)
        for i in range(3):
            for j in range(3):
                # squared norms and squared distances, against float64 sums over the whole tensors
                want = float((sds[i][big].double() - (sds[j][big].double() if j != i else 0)).pow(2).sum())
                got = float(g[i, i] + (g[j, j] - 2 * g[i, j] if j != i else 0))
                assert got == pytest.approx(want, rel=0.05)  # a sample, in float32: a few percent
        assert big in plan.distances.sampled
        basin = [p for p in plan.report.problems if p.check == "basin"]
        assert {p.ingredient for p in basin} == {"far"}
