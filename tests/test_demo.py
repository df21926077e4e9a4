"""The demo: real data loading, splits and typos; LP-FT mechanics on tiny models; the main job end to end.

The tests check mechanics (identical ingredients average to themselves, WiSE-FT's endpoints are exact, a
greedy soup's held-out score is at least the best single's); they never assert that a soup beats the best
single ingredient on test data.
"""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
import torch

from hf_soups import merge_models
from hf_soups.demo import data as demo_data
from hf_soups.demo.job import (
    DemoConfig,
    Row,
    _equal_weights,
    best_on_validation,
    cook_soups,
    evaluation_bar,
    format_table,
    parse_args,
    quiet_libraries,
)
from hf_soups.demo.train import (
    EncodedSplit,
    FineTuneConfig,
    encode,
    fine_tune,
    load_classifier,
    predict,
    train_linear_probe,
)
from hf_soups.errors import InvalidArgumentError
from tests.tiny_models import make_tiny_bert_dir

# ---------------------------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def corpus():
    return demo_data.load_rotten_tomatoes()


def test_corpus_is_the_12808_fresh_and_rotten_snippets(corpus):
    assert len(corpus) == demo_data.NUM_ROWS == 12_808
    assert Counter(corpus["label"]) == {1: 7403, 0: 5405}
    assert corpus.features["label"].names == ["rotten", "fresh"]
    assert all(isinstance(t, str) and t for t in corpus["text"][:50])


def test_splits_are_deterministic_disjoint_and_sized():
    a = demo_data.load_splits(seed=3, train_size=500, validation_size=200, test_size=300)
    b = demo_data.load_splits(seed=3, train_size=500, validation_size=200, test_size=300)
    c = demo_data.load_splits(seed=4, train_size=500, validation_size=200, test_size=300)
    assert {k: len(v) for k, v in a.items()} == {"train": 500, "validation": 200, "test": 300}
    for name in ("train", "validation", "test"):
        assert list(a[name]["text"]) == list(b[name]["text"])
    assert list(a["train"]["text"]) != list(c["train"]["text"])
    texts = {name: {" ".join(t.lower().split()) for t in a[name]["text"]} for name in a}
    assert not texts["train"] & texts["validation"]
    assert not texts["train"] & texts["test"]
    assert not texts["validation"] & texts["test"]


def test_test_split_defaults_to_every_remaining_row():
    splits = demo_data.load_splits(seed=0, train_size=5000, validation_size=2000, test_size=None)
    assert len(splits["test"]) == demo_data.NUM_ROWS - 7000
    with pytest.raises(InvalidArgumentError, match="exceeds"):
        demo_data.load_splits(seed=0, train_size=10_000, validation_size=3000, test_size=None)


def test_typos_keep_non_letters_and_are_seeded():
    text = "A thrilling, beautifully shot film -- 10/10, would watch again!"
    assert demo_data.add_typos(text, 0.0, 0) == text
    noisy = demo_data.add_typos(text, 0.3, 7)
    assert noisy == demo_data.add_typos(text, 0.3, 7)
    assert noisy != text
    assert [c for c in noisy if not c.isalpha()] == [c for c in text if not c.isalpha()]
    with pytest.raises(InvalidArgumentError, match="rate"):
        demo_data.add_typos(text, 1.5, 0)


def test_typo_rate_and_keyboard_neighbours():
    rng = random.Random(0)
    text = "abcdefghij" * 200
    noisy = demo_data.add_typos(text, 0.1, rng)
    # every error changes the letter count by at most one: the length moves by less than the error count
    assert abs(len(noisy) - len(text)) < 0.1 * len(text)
    # substitutions only: a one-letter string hit with rate 1 becomes one neighbouring key or a double/drop
    outcomes = {demo_data.add_typos("g", 1.0, seed) for seed in range(200)}
    assert outcomes <= set(demo_data.KEYBOARD_NEIGHBOURS["g"]) | {"gg", ""}
    assert set(demo_data.KEYBOARD_NEIGHBOURS["g"]) == set("ftyhbv")
    for key, near in demo_data.KEYBOARD_NEIGHBOURS.items():  # neighbourhood is symmetric
        for other in near:
            assert key in demo_data.KEYBOARD_NEIGHBOURS[other]


def test_typo_dataset_keeps_labels_and_length():
    splits = demo_data.load_splits(seed=0, train_size=10, validation_size=10, test_size=200)
    shifted = demo_data.typo_dataset(splits["test"], 0.15, seed=1)
    assert len(shifted) == 200
    assert list(shifted["label"]) == list(splits["test"]["label"])
    assert shifted.features == splits["test"].features
    changed = sum(a != b for a, b in zip(shifted["text"], splits["test"]["text"]))
    assert changed > 180
    assert list(shifted["text"]) == list(demo_data.typo_dataset(splits["test"], 0.15, seed=1)["text"])
    assert list(shifted["text"]) != list(demo_data.typo_dataset(splits["test"], 0.15, seed=2)["text"])


def test_minilm_tokenizer_and_truncation():
    tokenizer = demo_data.load_tokenizer()
    splits = demo_data.load_splits(seed=0, train_size=64, validation_size=8, test_size=8)
    tokenized = demo_data.tokenize(splits["train"], tokenizer, max_length=16)
    assert {"input_ids", "attention_mask", "label"} <= set(tokenized.column_names)
    assert max(len(ids) for ids in tokenized["input_ids"]) == 16
    encoded = encode(splits["train"], tokenizer)
    assert len(encoded) == 64 and max(len(ids) for ids in encoded.input_ids) <= demo_data.MAX_LENGTH
    assert (demo_data.minilm_path() / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------- LP-FT mechanics


def synthetic_split(n: int, seed: int) -> EncodedSplit:
    """Token ids of a tiny vocabulary; label 1 iff token 3 occurs (learnable by a tiny BERT)."""
    rng = random.Random(seed)
    ids, labels = [], []
    for _ in range(n):
        label = rng.random() < 0.5
        seq = [rng.randrange(10, 99) for _ in range(rng.randrange(4, 10))]
        seq.insert(rng.randrange(len(seq)), 3 if label else 4)
        ids.append([2, *seq])
        labels.append(int(label))
    return EncodedSplit(input_ids=ids, labels=labels)


@pytest.fixture(scope="module")
def lpft(tmp_path_factory):
    root = tmp_path_factory.mktemp("lpft")
    base = make_tiny_bert_dir(root / "base", seed=0, noise=0.0, num_labels=2)
    train, validation = synthetic_split(96, 0), synthetic_split(48, 1)
    probe = train_linear_probe(train, validation, output_dir=root / "probe", base_model=base)
    runs = [
        fine_tune(
            probe.path,
            train,
            FineTuneConfig(learning_rate=lr, steps=4, seed=s, batch_size=16),
            output_dir=root / f"ft-{i}",
        )
        for i, (lr, s) in enumerate([(1e-3, 0), (3e-3, 1), (1e-3, 2)])
    ]
    return root, base, probe, runs, train, validation


def _state(path):
    return {k: v.clone() for k, v in load_classifier(path).state_dict().items()}


def test_probe_trains_only_the_head(lpft):
    _, base, probe, _, _, validation = lpft
    before, after = _state(base), _state(probe.path)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"classifier.weight", "classifier.bias"}
    assert set(probe.sweep) == {1e-4, 1e-3, 1e-2}
    assert probe.validation_accuracy == max(probe.sweep.values())
    logits = predict(load_classifier(probe.path), validation)
    assert logits.shape == (48, 2)
    assert (
        abs(
            float((logits.argmax(-1) == torch.tensor(validation.labels).numpy()).mean())
            - probe.validation_accuracy
        )
        < 1e-6
    )
    # the validation logits the job reuses are the saved classifier's own (no second forward pass needed)
    assert probe.validation_logits.shape == (48, 2)
    assert abs(logits - probe.validation_logits).max() < 1e-5


def test_fine_tunes_start_from_the_probe_and_move_every_layer(lpft):
    root, _, probe, runs, train, _ = lpft
    start = _state(probe.path)
    tuned = _state(runs[0].path)
    moved = [k for k in start if start[k].is_floating_point() and not torch.equal(start[k], tuned[k])]
    assert "bert.encoder.layer.0.attention.self.query.weight" in moved and "classifier.weight" in moved
    again = fine_tune(probe.path, train, runs[0].config, output_dir=root / "again")
    assert all(torch.equal(v, _state(again.path)[k]) for k, v in tuned.items())  # seeded: reproducible
    assert runs[0].seconds_per_step > 0 and runs[0].name == "ft-lr0.001-s4-seed0"


def test_identical_ingredients_average_to_themselves(lpft):
    root, _, probe, runs, train, _ = lpft
    twin = fine_tune(probe.path, train, runs[0].config, output_dir=root / "twin")
    soup = merge_models([str(runs[0].path), str(twin.path)], method="uniform", progress=False)
    expected = _state(runs[0].path)
    for name, value in soup.model.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6)


def test_wise_ft_endpoints_are_the_probe_and_the_fine_tune(lpft):
    _, _, probe, runs, _, _ = lpft
    for alpha, expected in ((0.0, probe.path), (1.0, runs[1].path)):
        soup = merge_models(
            [str(runs[1].path)], method="wise-ft", base_model=str(probe.path), alpha=alpha, progress=False
        )
        want = _state(expected)
        for name, value in soup.model.state_dict().items():
            torch.testing.assert_close(value, want[name], rtol=0, atol=1e-6)


def test_cook_soups_greedy_is_at_least_the_best_single_on_validation(lpft, tmp_path):
    _, _, probe, runs, _, validation = lpft
    val_scores = {}
    for run in runs:
        hits = (
            predict(load_classifier(run.path), validation).argmax(-1)
            == torch.tensor(validation.labels).numpy()
        )
        val_scores[run.name] = float(hits.mean())
    best = max(val_scores, key=val_scores.get)
    soups = cook_soups(probe.path, runs, validation, val_scores, best, [0.0, 0.5, 1.0], tmp_path, None)
    assert set(soups) == {"uniform", "greedy", "wise-ft"}
    assert soups["greedy"].score >= max(val_scores.values())
    assert any(i.selected and i.name == best for i in soups["greedy"].ingredients)
    curve = {p["alpha"]: p["score"] for p in soups["wise-ft"].history}
    assert set(curve) == {0.0, 0.5, 1.0}
    assert soups["wise-ft"].score == max(curve.values())
    assert curve[1.0] == pytest.approx(val_scores[best])  # alpha=1 is the best single itself
    assert soups["uniform"].coefficients == pytest.approx([1 / 3] * 3)


def test_a_greedy_soup_of_every_ingredient_is_the_uniform_soup_bit_for_bit(lpft, tmp_path):
    # the job reuses the uniform soup's row for such a greedy soup: the weights must be the same, not just close
    root, _, probe, _, train, validation = lpft
    runs = [
        fine_tune(
            probe.path,
            train,
            FineTuneConfig(learning_rate=1e-4, steps=4, seed=s, batch_size=16),
            output_dir=root / f"low-{s}",
        )
        for s in range(3)
    ]
    labels = torch.tensor(validation.labels).numpy()
    scores = {
        r.name: float((predict(load_classifier(r.path), validation).argmax(-1) == labels).mean())
        for r in runs
    }
    best = max(scores, key=scores.get)
    soups = cook_soups(probe.path, runs, validation, scores, best, [1.0], None, None)
    assert all(i.selected for i in soups["greedy"].ingredients)  # near-identical runs: greedy keeps them all
    assert _equal_weights(soups["greedy"].model, soups["uniform"].model)
    assert not _equal_weights(soups["greedy"].model, load_classifier(runs[0].path))


# ---------------------------------------------------------------------------------------------- job pieces


def test_table_and_choice_use_validation():
    rows = [
        Row("a", "ingredient", {"validation": 0.7, "test": 0.9}),
        Row("b", "ingredient", {"validation": 0.8, "test": 0.6}),
        Row("c", "ingredient", {"validation": 0.8, "test": 0.99}),
    ]
    assert best_on_validation(rows).name == "b"  # ties: the first; test never decides
    text = format_table(rows, ["validation", "test"])
    assert text.splitlines()[0].split() == ["model", "validation", "test", "note"]
    assert "80.00" in text and "99.00" in text
    md = format_table(rows, ["validation", "test"], markdown=True)
    assert md.startswith("| model | validation | test | note |") and md.count("\n") == 4


def test_parse_args_and_smoke_config(tmp_path):
    config = parse_args(["--smoke", "--output-dir", str(tmp_path)])
    assert config.smoke and config.output_dir == str(tmp_path) and config.steps == 3
    config = parse_args(["--learning-rates", "1e-4", "2e-4", "--seeds", "0", "--steps", "10"])
    assert config.learning_rates == [1e-4, 2e-4] and config.seeds == [0] and config.steps == 10
    assert DemoConfig().test_size > 0


def test_bad_configuration_exits_2_before_any_work(tmp_path, capsys):
    from hf_soups.demo import main

    code = main(["--learning-rates", "1e-4", "--seeds", "0", "--output-dir", str(tmp_path / "out")])
    assert code == 2
    assert "at least two ingredients" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_evaluation_bar_is_shown_unless_progress_bars_are_off(monkeypatch, capsys):
    import importlib

    hub_tqdm = importlib.import_module(
        "huggingface_hub.utils.tqdm"
    )  # the module (the package exports the class)
    # the suite runs with HF_HUB_DISABLE_PROGRESS_BARS=1, which huggingface_hub reads once into this constant
    monkeypatch.setattr(hub_tqdm, "HF_HUB_DISABLE_PROGRESS_BARS", None)
    monkeypatch.setattr(hub_tqdm, "progress_bar_states", {})
    quiet_libraries()  # what `hf-soups demo` does: transformers' and datasets' bars off (all hub bars), ours on
    with evaluation_bar(3, "Scoring the soups") as bar:
        bar.update(3)
    assert "Scoring the soups" in capsys.readouterr().err
    monkeypatch.setattr(hub_tqdm, "HF_HUB_DISABLE_PROGRESS_BARS", True)  # the user set the variable
    monkeypatch.setattr(hub_tqdm, "progress_bar_states", {})
    quiet_libraries()
    with evaluation_bar(3, "Scoring the soups") as bar:
        bar.update(3)
    assert "Scoring the soups" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_demo_smoke_end_to_end(tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hf_soups.cli import main as cli_main

    out = tmp_path / "demo-output"
    assert cli_main(["demo", "--smoke", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    for label in (
        "Training a linear probe",  # a line as each phase starts
        "Scoring the probe and",
        "Cooking soups of the",
        "Scoring the soups:",
        "linear probe (LP)",
        "best single",
        "uniform soup",
        "greedy soup",
        "WiSE-FT",
        "test+typos 15%",
    ):
        assert label in printed
    results = json.loads((out / "results.json").read_text())
    rows = {r["kind"]: r for r in results["rows"]}
    assert rows["greedy"]["accuracy"]["validation"] >= rows["best single"]["accuracy"]["validation"]
    assert results["eval_sets"] == ["validation", "test", "test+typos 5%", "test+typos 15%"]
    assert results["sizes"]["test"] == 64 and results["chosen"] in ("uniform", "greedy", "wise-ft")
    assert (out / "results.png").stat().st_size > 10_000
    assert "greedy soup" in (out / "results.md").read_text()
    card = (out / "soup" / "README.md").read_text()
    assert "soup" in card.lower()
    model = AutoModelForSequenceClassification.from_pretrained(out / "soup")
    tokenizer = AutoTokenizer.from_pretrained(out / "soup")
    assert model.config.id2label == {0: "rotten", 1: "fresh"}
    logits = model(**tokenizer(["A triumph."], return_tensors="pt")).logits
    assert logits.shape == (1, 2)
    assert not (out / "ingredients").exists()  # intermediates are removed unless --keep-ingredients


# ---------------------------------------------------------------------------------------------- paper_repro helpers


def test_paper_repro_statistics_and_section_writer(tmp_path):
    import numpy as np

    from benchmarks.paper_repro import SECTION, bootstrap_ci, compare, mcnemar, write_section

    best = np.ones(100, dtype=bool)
    soup = best.copy()
    soup[:10] = False  # the soup loses 10 rows and gains none
    gain, loss, p = mcnemar(best, soup)
    assert (gain, loss) == (0, 10) and p == pytest.approx(2 * 0.5**10)
    assert mcnemar(best, best) == (0, 0, 1.0)
    lo, hi = bootstrap_ci(best, soup, 500)
    assert lo <= -10.0 <= hi and hi <= 0.0
    assert bootstrap_ci(best, best, 100) == (0.0, 0.0)
    c = compare(best, soup, 500)
    assert c["diff"] == pytest.approx(-10.0) and (c["gain"], c["loss"]) == (0, 10) and c["ci"][1] <= 0.0

    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# Benchmarks\n\n## Other\n\nkeep me\n\n{SECTION}\n\n_Pending._\n\n## Later\n\nme too\n")
    write_section(doc, f"{SECTION}\n\nnew table\n")
    text = doc.read_text()
    assert "keep me" in text and "me too" in text and "new table" in text and "_Pending._" not in text
    assert text.index("new table") < text.index("## Later")
    write_section(doc, f"{SECTION}\n\nnewer\n")
    assert doc.read_text().count(SECTION) == 1 and "new table" not in doc.read_text()


def test_paper_repro_record_renders_from_its_json(tmp_path):
    from benchmarks.paper_repro import RECORDS, ROOT, _clean_command, main

    section = RECORDS["reduced"].section

    cmd = (
        "python benchmarks/paper_repro.py --preset reduced --docs /tmp/d.md --json /tmp/r.json --steps 40 80"
    )
    assert _clean_command(cmd) == "python benchmarks/paper_repro.py --preset reduced --steps 40 80"
    record = ROOT / "benchmarks" / "results" / "paper_repro.json"
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# Benchmarks\n\n{section}\n\n_Pending._\n")
    argv = ["--render-json", str(record), "--docs", str(doc), "--img", str(tmp_path / "p.png")]
    assert main(argv) == 0
    text = doc.read_text()
    assert "| greedy soup (kept" in text and "McNemar" in text and "_Pending._" not in text
    assert "--docs" not in text.split("Command:")[1].splitlines()[0]
    assert (tmp_path / "p.png").stat().st_size > 10_000
    # the hand-written reading belongs to its record: rendered with it, absent for a record without one
    assert "How to read this" in text
    bare = json.loads(record.read_text())
    bare.pop("reading", None)
    (tmp_path / "bare.json").write_text(json.dumps(bare))
    assert main(["--render-json", str(tmp_path / "bare.json"), "--docs", str(doc), "--img", ""]) == 0
    assert "How to read this" not in doc.read_text()
    # each preset keeps its own section: a full-preset record lands beside the reduced one, not over it
    full = dict(bare, command=bare["command"].replace(" --preset reduced", ""))
    (tmp_path / "full.json").write_text(json.dumps(full))
    assert main(["--render-json", str(tmp_path / "full.json"), "--docs", str(doc), "--img", ""]) == 0
    text = doc.read_text()
    assert text.count(section) == 1 and text.count(RECORDS["full"].section) == 1
    assert "**Reduced setting**" in text.split(RECORDS["full"].section)[0]
    assert "**Reduced setting**" not in text.split(RECORDS["full"].section)[1]
    assert "img/paper_repro_full.png" in text


def test_paper_repro_verdict_counts_significant_seeds_each_way():
    from benchmarks.paper_repro import verdict

    def c(diff, p, gain=5, loss=3):
        return {"diff": diff, "p": p, "gain": gain, "loss": loss}

    assert verdict([c(2.0, 0.001), c(1.0, 0.01)]) == "better, p < 0.05 in every seed"
    assert verdict([c(-2.0, 0.001), c(-1.0, 0.01)]) == "worse, p < 0.05 in every seed"
    assert verdict([c(0.3, 0.4), c(-0.2, 0.6)]) == "within noise"
    # significant both ways is not "within noise"
    assert (
        verdict([c(3.7, 0.001), c(5.9, 0.001), c(-4.4, 0.001)])
        == "mixed: better in 2, worse in 1 of 3 seeds (p < 0.05)"
    )
    mixed = verdict([c(1.5, 0.001), c(0.0, 1.0, 0, 0), c(0.0, 1.0, 0, 0)])
    assert mixed.startswith("mixed: better in 1, within noise in 2 of 3 seeds")
    assert mixed.endswith("the same predictions as the best single in 2")


@pytest.mark.slow
def test_soup_failure_runs_end_to_end_and_writes_its_section(tmp_path):
    """The failure-mode benchmark's mechanics on a tiny run; a 1e-1 learning rate stands in for "too high"."""
    from benchmarks.paper_repro import SECTION as REPRO
    from benchmarks.soup_failure import SECTION, main

    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# Benchmarks\n\n{REPRO}\n\nkeep me\n")
    record = tmp_path / "r.json"
    argv = [
        "--learning-rates",
        "1e-4",
        "1e-1",
        "--steps",
        "2",
        "--train-size",
        "128",
        "--validation-size",
        "64",
    ]
    argv += ["--test-size", "64", "--bootstrap", "50", "--device", "cpu", "--docs", str(doc)]
    argv += ["--img", str(tmp_path / "f.png"), "--json", str(record)]
    assert main(argv) == 0
    result = json.loads(record.read_text())["result"]
    assert [p["lr"] for p in result["pairs"]] == [1e-4, 1e-1]
    # one row per learning-rate cap, each souping every trained ingredient up to it
    trained = [i for i in result["ingredients"] if i["accuracy"] is not None]
    assert [row["n"] for row in result["nested"]] == [
        sum(1 for i in trained if i["lr"] <= cap) for cap in (1e-4, 1e-1)
    ]
    for pair in result["pairs"]:
        if pair["midpoint"] is not None:
            ends = [i["accuracy"]["test"] for i in trained if i["name"] in pair["runs"]]
            assert pair["barrier"]["test"] == pytest.approx(sum(ends) / 2 - pair["midpoint"]["test"])
    # greedy starts from the best single (on validation) and never lowers its validation score
    best = max(trained, key=lambda i: i["accuracy"]["validation"])
    assert result["greedy"]["accuracy"]["validation"] >= best["accuracy"]["validation"]
    top = best["accuracy"]["validation"]
    assert any(i["accuracy"]["validation"] == top for i in trained if i["name"] in result["greedy"]["kept"])
    text = doc.read_text()
    assert "keep me" in text and SECTION in text and text.index(REPRO) < text.index(SECTION)
    assert "| uniform, lr <= 0.1 |" in text and "--docs" not in text
    assert (tmp_path / "f.png").stat().st_size > 10_000
    # the record re-renders without recomputing
    doc.write_text(f"{SECTION}\n\n_Pending._\n")
    assert main(["--render-json", str(record), "--docs", str(doc), "--img", ""]) == 0
    assert "_Pending._" not in doc.read_text() and "| greedy, all" in doc.read_text()


def test_a_diverging_fine_tune_raises_its_own_error(lpft):
    """soup_failure.py records diverged runs and goes on; it must tell them from bad arguments."""
    from hf_soups.demo.train import DivergedError

    root, _, probe, _, train, _ = lpft
    with pytest.raises(DivergedError, match="diverged"):
        fine_tune(probe.path, train, FineTuneConfig(learning_rate=1e30, steps=6), output_dir=root / "boom")
    with pytest.raises(
        InvalidArgumentError
    ) as info:  # an empty split is a caller's mistake, not a divergence
        empty = EncodedSplit(input_ids=[], labels=[])
        fine_tune(probe.path, empty, FineTuneConfig(learning_rate=1e-3, steps=1), output_dir=root / "x")
    assert not isinstance(info.value, DivergedError)
