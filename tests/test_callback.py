"""SoupTrainerCallback: ingredients collected from real Trainer runs (tiny BERT, CPU, a few steps each)."""

from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_soups import IngredientNotFoundError, InvalidArgumentError, SoupTrainerCallback, merge_models
from hf_soups.integrations.callback import INGREDIENT_METADATA, INGREDIENTS_MANIFEST, list_ingredients
from tests.testing_common import (
    QUIET_CPU_RUN,
    assert_state_close,
    float64_mean,
    read_safetensors,
    replay_greedy,
)
from tests.tiny_models import make_tiny_bert

NUM_LABELS = 3
SEQ_LEN = 8


def _dataset(n: int, seed: int):
    """A learnable toy task: the label is the first token's id modulo 3."""
    from datasets import Dataset

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 99, (n, SEQ_LEN), generator=gen)
    return Dataset.from_dict(
        {
            "input_ids": ids.tolist(),
            "attention_mask": torch.ones(n, SEQ_LEN, dtype=torch.long).tolist(),
            "labels": (ids[:, 0] % NUM_LABELS).tolist(),
        }
    )


@pytest.fixture(scope="module")
def train_ds():
    return _dataset(32, seed=0)


@pytest.fixture(scope="module")
def eval_ds():
    return _dataset(24, seed=1)


def compute_metrics(p) -> dict[str, float]:
    preds = p.predictions.argmax(-1)
    return {"accuracy": float((preds == p.label_ids).mean())}


def _args(output_dir: Path, **overrides):
    from transformers import TrainingArguments

    kwargs = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        max_steps=4,
        learning_rate=1e-3,
        **QUIET_CPU_RUN,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def _trainer(args, train_ds, callback, eval_ds=None, model=None, attach=True, **kwargs):
    """A Trainer with `callback` in its callbacks; `attach=True` also gives the callback its trainer."""
    from transformers import Trainer

    if model is None and "model_init" not in kwargs:
        model = make_tiny_bert(seed=0)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        callbacks=[callback],
        **kwargs,
    )
    if attach:
        callback.attach(trainer)
    return trainer


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().float() for k, v in model.state_dict().items()}


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol=1e-6):
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), atol=atol, rtol=0, msg=k)


def _mean(state_dicts):
    return {k: sum(sd[k] for sd in state_dicts) / len(state_dicts) for k in state_dicts[0]}


# ----------------------------------------------------------------------------------------------------- collecting


def test_three_trainer_runs_share_one_callback(tmp_path, train_ds):
    cb = SoupTrainerCallback(ingredients_dir=tmp_path / "ingredients")
    finals = []
    lrs = [1e-3, 3e-3, 1e-2]
    for i, lr in enumerate(lrs):
        trainer = _trainer(_args(tmp_path / f"run{i}", learning_rate=lr, seed=10 + i), train_ds, cb)
        trainer.train()
        finals.append(_weights(trainer.model))
    # the three runs really differ
    assert not torch.equal(finals[0]["classifier.weight"], finals[2]["classifier.weight"])

    ingredients = cb.ingredients
    assert len(ingredients) == 3
    assert (tmp_path / "ingredients" / INGREDIENTS_MANIFEST).is_file()
    for ing, lr, seed in zip(ingredients, lrs, [10, 11, 12]):
        folder = Path(ing.reference)
        assert (folder / "model.safetensors").is_file()
        assert not (folder / "training_args.bin").exists()
        meta = ing.metadata
        assert meta["kind"] == "final"
        assert meta["hyperparameters"]["learning_rate"] == pytest.approx(lr)
        assert meta["seed"] == seed
        assert meta["global_step"] == 4
        assert meta["trial_params"] is None

    soup = cb.cook()
    assert soup is cb.soup
    assert len(soup.ingredients) == 3
    assert [i.metadata["hyperparameters"]["learning_rate"] for i in soup.ingredients] == pytest.approx(lrs)
    _assert_close(_weights(soup.model), _mean(finals), atol=1e-5)


def test_hyperparameter_search_optuna_gives_one_ingredient_per_trial(tmp_path, train_ds, eval_ds):
    cb = SoupTrainerCallback(ingredients_dir=tmp_path / "ingredients")
    trainer = _trainer(
        _args(tmp_path / "search"),
        train_ds,
        cb,
        eval_ds=eval_ds,
        model_init=lambda: make_tiny_bert(seed=0),
        compute_metrics=compute_metrics,
    )

    def hp_space(trial):
        return {
            "learning_rate": trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True),
            "seed": trial.suggest_int("seed", 0, 1000),
        }

    best = trainer.hyperparameter_search(
        hp_space=hp_space,
        backend="optuna",
        n_trials=3,
        direction="maximize",
        compute_objective=lambda metrics: metrics["eval_accuracy"],
    )
    ingredients = cb.ingredients
    assert len(ingredients) == 3
    recorded = [ing.metadata["trial_params"] for ing in ingredients]
    assert best.hyperparameters in recorded
    for ing in ingredients:
        meta = ing.metadata
        assert ing.name.startswith(f"trial-{ingredients.index(ing)}-")
        assert meta["hyperparameters"]["learning_rate"] == pytest.approx(
            meta["trial_params"]["learning_rate"]
        )
        assert meta["seed"] == meta["trial_params"]["seed"]
        # the search evaluated after each trial; the callback attached those held-out metrics to the ingredient
        assert 0.0 <= meta["metrics"]["eval_accuracy"] <= 1.0
        assert meta["metrics_step"] == meta["global_step"] == 4

    soup = cb.cook()
    assert len(soup.ingredients) == 3
    assert [i.metadata["trial_params"] for i in soup.ingredients] == recorded
    # the search released trainer.model after the last trial: replacing it is refused before any cooking
    assert trainer.model is None
    with pytest.raises(InvalidArgumentError, match="holds no model"):
        cb.cook(replace_model=True)


def test_pruned_trials_are_not_ingredients(tmp_path, train_ds, eval_ds):
    import optuna  # a dev dependency (make install)

    class PruneFirstTrial(optuna.pruners.BasePruner):
        def prune(self, study, trial):
            return trial.number == 0

    cb = SoupTrainerCallback(ingredients_dir=tmp_path / "ingredients")
    trainer = _trainer(
        _args(tmp_path / "search", max_steps=6, eval_strategy="steps", eval_steps=2),
        train_ds,
        cb,
        eval_ds=eval_ds,
        model_init=lambda: make_tiny_bert(seed=0),
        compute_metrics=compute_metrics,
    )
    trainer.hyperparameter_search(
        hp_space=lambda trial: {"learning_rate": trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True)},
        backend="optuna",
        n_trials=2,
        direction="maximize",
        compute_objective=lambda metrics: metrics["eval_accuracy"],
        pruner=PruneFirstTrial(),  # trial 0 is pruned at its first evaluation (step 2), trial 1 completes
    )
    (ingredient,) = cb.ingredients
    assert ingredient.name.startswith("trial-1-")
    assert ingredient.metadata["global_step"] == 6
    # evaluated during training at step 6: those metrics were recorded when the run ended
    assert ingredient.metadata["metrics_step"] == 6 and "eval_accuracy" in ingredient.metadata["metrics"]


def test_final_model_after_load_best_model_at_end(tmp_path, train_ds, eval_ds):
    cb = SoupTrainerCallback(ingredients_dir=tmp_path / "ingredients")
    out = tmp_path / "run"
    args = _args(
        out,
        max_steps=6,
        learning_rate=5e-3,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
    )
    trainer = _trainer(args, train_ds, cb, eval_ds=eval_ds, compute_metrics=compute_metrics)
    trainer.train()
    (ing,) = cb.ingredients
    best_step = trainer.state.best_global_step
    evals = {e["step"]: e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e}
    assert best_step == min(evals, key=evals.get)
    # the ingredient is the model the trainer ends with (the best checkpoint), with that checkpoint's metrics
    assert ing.metadata["metrics_step"] == best_step
    assert ing.metadata["metrics"]["eval_loss"] == pytest.approx(evals[best_step])
    ours = load_file(Path(ing.reference) / "model.safetensors")
    _assert_close(ours, load_file(out / f"checkpoint-{best_step}" / "model.safetensors"), atol=0)


def test_checkpoint_collection_copies_each_checkpoint(tmp_path, train_ds):
    cb = SoupTrainerCallback(ingredients_dir=tmp_path / "ingredients", collect="checkpoints")
    out = tmp_path / "run"
    trainer = _trainer(_args(out, max_steps=6, save_strategy="steps", save_steps=2), train_ds, cb)
    trainer.train()

    ingredients = cb.ingredients
    assert [i.metadata["global_step"] for i in ingredients] == [2, 4, 6]
    assert all(i.metadata["kind"] == "checkpoint" for i in ingredients)
    assert len({i.metadata["run"] for i in ingredients}) == 1
    for ing in ingredients:
        step = ing.metadata["global_step"]
        folder = Path(ing.reference)
        assert folder.name.endswith(f"-checkpoint-{step}")
        assert not (folder / "optimizer.pt").exists() and not (folder / "trainer_state.json").exists()
        ours = load_file(folder / "model.safetensors")
        theirs = load_file(out / f"checkpoint-{step}" / "model.safetensors")
        _assert_close(ours, theirs, atol=0)
    # the checkpoints differ, so the soup is a real average
    first, last = (
        load_file(Path(i.reference) / "model.safetensors") for i in (ingredients[0], ingredients[-1])
    )
    assert not torch.equal(first["classifier.weight"], last["classifier.weight"])


def test_checkpoint_collection_last_k_and_per_run_soups(tmp_path, train_ds):
    cb = SoupTrainerCallback(
        ingredients_dir=tmp_path / "ingredients", collect="checkpoints", last_k=2, cook_on="train_end"
    )
    runs = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        trainer = _trainer(_args(out, max_steps=6, save_strategy="steps", save_steps=2, seed=i), train_ds, cb)
        trainer.train()
        # cook_on="train_end" with checkpoints: a soup of this run's last 2 checkpoints only
        assert [ing.metadata["global_step"] for ing in cb.soup.ingredients] == [4, 6]
        expected = _mean([load_file(out / f"checkpoint-{s}" / "model.safetensors") for s in (4, 6)])
        soup_weights = _weights(cb.soup.model)
        _assert_close({k: soup_weights[k] for k in expected}, expected, atol=1e-6)
        runs.append(cb.soup.ingredients[0].metadata["run"])
    assert runs[0] != runs[1]
    assert sorted(i.metadata["global_step"] for i in cb.ingredients) == [4, 4, 6, 6]


def test_resuming_from_a_checkpoint_continues_the_run(tmp_path, train_ds):
    cb = SoupTrainerCallback(ingredients_dir=tmp_path / "ingredients", collect="checkpoints")
    out = tmp_path / "run"
    _trainer(_args(out, max_steps=4, save_strategy="steps", save_steps=2), train_ds, cb).train()
    (first_run,) = {i.metadata["run"] for i in cb.ingredients}
    # a new process resumes from checkpoint-4 with a fresh trainer (and a fresh callback, read from the same folder)
    cb2 = SoupTrainerCallback(ingredients_dir=tmp_path / "ingredients", collect="checkpoints", last_k=2)
    trainer = _trainer(_args(out, max_steps=8, save_strategy="steps", save_steps=2), train_ds, cb2)
    trainer.train(resume_from_checkpoint=str(out / "checkpoint-4"))
    ingredients = cb2.ingredients
    assert [i.metadata["global_step"] for i in ingredients] == [
        6,
        8,
    ]  # last_k counted the resumed run's folders
    assert len({i.metadata["run"] for i in ingredients}) == 1
    assert ingredients[0].metadata["run"] == first_run


def test_checkpoints_need_a_save_strategy(tmp_path, train_ds):
    cb = SoupTrainerCallback(ingredients_dir=tmp_path / "ingredients", collect="checkpoints")
    trainer = _trainer(_args(tmp_path / "run"), train_ds, cb)
    with pytest.raises(InvalidArgumentError, match="save_strategy"):
        trainer.train()


def _tiny_tokenizer(folder: Path):
    from transformers import BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"tok{i}" for i in range(94)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizer(vocab_file=str(folder / "vocab.txt"))


def test_collects_without_the_trainer_from_what_the_hooks_receive(tmp_path, train_ds, caplog):
    """Transformers does not pass the trainer to callbacks: collecting uses the hook's model and processing class."""
    cb = SoupTrainerCallback(ingredients_dir=tmp_path / "ingredients")
    tokenizer = _tiny_tokenizer(tmp_path / "tok")
    finals = []
    for i in range(2):
        args = _args(tmp_path / f"run{i}", seed=i, learning_rate=3e-3 * (i + 1))
        trainer = _trainer(args, train_ds, cb, processing_class=tokenizer, attach=False)
        trainer.train()
        finals.append(_weights(trainer.model))
    assert cb.trainer is None  # nobody gave it, and the callback does not look for it
    ingredients = cb.ingredients
    assert len(ingredients) == 2
    for ing, final in zip(ingredients, finals):
        folder = Path(ing.reference)
        _assert_close(load_file(folder / "model.safetensors"), final, atol=0)
        # the processing class is saved beside the model, as Trainer.save_model does
        assert (folder / "tokenizer_config.json").is_file() and (folder / "config.json").is_file()
    with caplog.at_level(logging.WARNING, logger="hf_soups.integrations.callback"):
        soup = cb.cook()
    _assert_close(_weights(soup.model), _mean(finals), atol=1e-5)
    assert any("cb.attach(trainer)" in r.getMessage() for r in caplog.records), caplog.records


def test_replace_model_without_the_trainer_fails_before_training(tmp_path, train_ds):
    cb = SoupTrainerCallback(ingredients_dir=tmp_path / "ingredients", replace_model=True)
    trainer = _trainer(_args(tmp_path / "run"), train_ds, cb, attach=False)
    with pytest.raises(InvalidArgumentError, match=r"cb\.attach\(trainer\)"):
        trainer.train()
    assert trainer.state.global_step == 0 and cb.ingredients == []


def test_attach_adds_the_callback_once_and_binds_it(tmp_path, train_ds):
    from transformers import Trainer

    trainer = Trainer(model=make_tiny_bert(seed=0), args=_args(tmp_path / "run"), train_dataset=train_ds)
    cb = SoupTrainerCallback(ingredients_dir=tmp_path / "ingredients")
    assert cb.attach(trainer) is cb and cb.attach(trainer) is cb
    assert [c for c in trainer.callback_handler.callbacks if c is cb] == [cb]
    assert cb.trainer is trainer
    trainer.train()
    (ingredient,) = cb.ingredients
    _assert_close(
        load_file(Path(ingredient.reference) / "model.safetensors"), _weights(trainer.model), atol=0
    )
    # already in callbacks=[...]: attach only binds
    cb2 = SoupTrainerCallback(ingredients_dir=tmp_path / "other")
    trainer2 = _trainer(_args(tmp_path / "run2"), train_ds, cb2, attach=False)
    cb2.attach(trainer2)
    assert [c for c in trainer2.callback_handler.callbacks if c is cb2] == [cb2]


def test_a_callback_attached_to_another_trainer_is_refused(tmp_path, train_ds):
    """Saving through the wrong trainer would store the wrong model: a stale binding fails before training."""
    cb = SoupTrainerCallback(ingredients_dir=tmp_path / "ingredients")
    _trainer(_args(tmp_path / "run0"), train_ds, cb)  # attached to this one
    other = _trainer(_args(tmp_path / "run1"), train_ds, cb, attach=False)
    with pytest.raises(InvalidArgumentError, match="another Trainer"):
        other.train()
    assert cb.ingredients == []


def test_sharded_training_without_the_trainer_is_refused(tmp_path, train_ds, monkeypatch):
    """FSDP / DeepSpeed weights are gathered by trainer.save_model: without the trainer, refuse before training."""
    cb = SoupTrainerCallback(ingredients_dir=tmp_path / "ingredients")
    trainer = _trainer(_args(tmp_path / "run"), train_ds, cb, attach=False)
    monkeypatch.setattr(
        trainer.args, "fsdp", True
    )  # what TrainingArguments(fsdp=...) leaves after validation
    with pytest.raises(InvalidArgumentError, match="FSDP / DeepSpeed"):
        trainer.train()
    assert cb.ingredients == []


# ----------------------------------------------------------------------------------------------------- cooking


def test_replace_model_loads_the_soup_into_trainer_model(tmp_path, train_ds):
    cb = SoupTrainerCallback(
        ingredients_dir=tmp_path / "ingredients",
        collect="checkpoints",
        cook_on="train_end",
        replace_model=True,
    )
    out = tmp_path / "run"
    model = make_tiny_bert(seed=0)
    params_before = {name: id(p) for name, p in model.named_parameters()}
    trainer = _trainer(
        _args(out, max_steps=6, save_strategy="steps", save_steps=2), train_ds, cb, model=model
    )
    trainer.train()

    assert trainer.model is model
    assert {name: id(p) for name, p in model.named_parameters()} == params_before  # updated in place
    checkpoints = [load_file(out / f"checkpoint-{s}" / "model.safetensors") for s in (2, 4, 6)]
    expected = _mean(checkpoints)
    live = _weights(trainer.model)
    _assert_close({k: live[k] for k in expected}, expected, atol=1e-6)
    _assert_close(live, _weights(cb.soup.model), atol=0)
    # and it is not the last checkpoint any more
    assert not torch.allclose(live["classifier.weight"], checkpoints[-1]["classifier.weight"].float())


def test_soup_metrics_land_in_log_history(tmp_path, train_ds, eval_ds):
    cb = SoupTrainerCallback(
        ingredients_dir=tmp_path / "ingredients",
        collect="checkpoints",
        cook_on="train_end",
        replace_model=True,
    )
    trainer = _trainer(
        _args(tmp_path / "run", max_steps=4, save_strategy="steps", save_steps=2),
        train_ds,
        cb,
        eval_ds=eval_ds,
        compute_metrics=compute_metrics,
    )
    trainer.train()
    soup_logs = [entry for entry in trainer.state.log_history if any(k.startswith("soup_") for k in entry)]
    assert soup_logs, trainer.state.log_history
    merged = {k: v for entry in soup_logs for k, v in entry.items()}
    assert merged["soup_num_ingredients"] == 2
    assert "soup_accuracy" in merged

    # the logged accuracy is the soup's own accuracy on the eval set
    model = cb.soup.model.eval()
    with torch.no_grad():
        logits = model(
            input_ids=torch.tensor(eval_ds["input_ids"]),
            attention_mask=torch.tensor(eval_ds["attention_mask"]),
        ).logits
    accuracy = float((logits.argmax(-1) == torch.tensor(eval_ds["labels"])).float().mean())
    assert merged["soup_accuracy"] == pytest.approx(accuracy)


def test_cooking_later_from_dir_and_with_merge_models(tmp_path, train_ds):
    cb = SoupTrainerCallback(ingredients_dir=tmp_path / "ingredients")
    for i in range(2):
        _trainer(_args(tmp_path / f"run{i}", seed=i, learning_rate=2e-3 * (i + 1)), train_ds, cb).train()
    soup = cb.cook()

    later = SoupTrainerCallback.from_dir(tmp_path / "ingredients")
    assert [i.name for i in later.ingredients] == [i.name for i in cb.ingredients]
    _assert_close(_weights(later.cook().model), _weights(soup.model), atol=0)

    via_api = merge_models(str(tmp_path / "ingredients"))
    assert [i.name for i in via_api.ingredients] == [i.name for i in cb.ingredients]
    assert via_api.ingredients[1].metadata["hyperparameters"]["learning_rate"] == pytest.approx(4e-3)
    _assert_close(_weights(via_api.model), _weights(soup.model), atol=0)

    with pytest.raises(IngredientNotFoundError):
        SoupTrainerCallback.from_dir(tmp_path / "run0")


def test_out_of_process_trials_collect_through_the_disk(tmp_path, train_ds):
    """Ray Tune pickles the trainer (and its callbacks) into worker processes: what they write still counts."""
    cb = SoupTrainerCallback(ingredients_dir=tmp_path / "ingredients")
    trainer = _trainer(_args(tmp_path / "run0"), train_ds, cb)
    trainer.train()
    assert cb.trainer is trainer

    worker_cb = pickle.loads(pickle.dumps(cb))  # what a worker process receives
    assert worker_cb.trainer is None and worker_cb.ingredients_dir == cb.ingredients_dir
    # a worker's callback is not given the worker's trainer: it collects from what the hooks receive
    _trainer(_args(tmp_path / "run1", learning_rate=5e-3), train_ds, worker_cb, attach=False).train()

    # a real second process writes a third ingredient with its own copy of the callback
    script = tmp_path / "worker.py"
    script.write_text(
        "import pickle, sys\n"
        "sys.path.insert(0, sys.argv[3])\n"
        "from tests.test_callback import _args, _dataset, _trainer\n"
        "cb = pickle.loads(open(sys.argv[1], 'rb').read())\n"
        "_trainer(_args(sys.argv[2], learning_rate=7e-3), _dataset(32, seed=0), cb, attach=False).train()\n"
    )
    (tmp_path / "cb.pkl").write_bytes(pickle.dumps(cb))
    root = Path(__file__).resolve().parents[1]
    subprocess.run(
        [sys.executable, str(script), str(tmp_path / "cb.pkl"), str(tmp_path / "run2"), str(root)],
        check=True,
        cwd=root,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )

    lrs = [i.metadata["hyperparameters"]["learning_rate"] for i in cb.ingredients]
    assert lrs == pytest.approx([1e-3, 5e-3, 7e-3])
    assert len(cb.cook().ingredients) == 3


def test_keep_ingredients_false_removes_them_after_cooking(tmp_path, train_ds):
    cb = SoupTrainerCallback(ingredients_dir=tmp_path / "ingredients", keep_ingredients=False)
    for i in range(2):
        _trainer(_args(tmp_path / f"run{i}", seed=i), train_ds, cb).train()
    folders = [Path(i.reference) for i in cb.ingredients]
    assert len(folders) == 2 and all(f.is_dir() for f in folders)
    expected = float64_mean([read_safetensors(f) for f in folders])
    soup = cb.cook()
    assert len(soup.ingredients) == 2
    assert not any(f.exists() for f in folders)
    # the in-memory soup survives its ingredients: it holds the mean of the two runs
    assert_state_close(dict(soup.model.state_dict()), expected, atol=1e-6)
    with pytest.raises(InvalidArgumentError, match="No ingredient"):
        cb.cook()


def test_warns_when_ingredients_would_not_fit_on_disk(tmp_path, train_ds, monkeypatch, caplog):
    import hf_soups.integrations.callback as callback_module

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(callback_module.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 999, 999))
    cb = SoupTrainerCallback(ingredients_dir=tmp_path / "ingredients", collect="checkpoints")
    trainer = _trainer(
        _args(tmp_path / "run", max_steps=4, save_strategy="steps", save_steps=2), train_ds, cb
    )
    with caplog.at_level(logging.WARNING, logger="hf_soups.integrations.callback"):
        trainer.train()
    warnings = [r.getMessage() for r in caplog.records if r.name == "hf_soups.integrations.callback"]
    assert any("2 ingredient(s)" in w and "only 999 B are free" in w for w in warnings), warnings


# ----------------------------------------------------------------------------------------------------- options


def test_defaults_follow_the_trainer(tmp_path, train_ds, eval_ds):
    cb = SoupTrainerCallback(ingredients_dir=tmp_path / "ingredients")
    args = _args(
        tmp_path / "run",
        metric_for_best_model="accuracy",
        per_device_eval_batch_size=5,
    )
    trainer = _trainer(args, train_ds, cb, eval_ds=eval_ds, compute_metrics=compute_metrics)
    assert cb.trainer is trainer  # given by cb.attach(trainer)
    assert SoupTrainerCallback(
        ingredients_dir="relative/dir"
    ).ingredients_dir.is_absolute()  # Ray changes cwd
    options = cb._resolve_options({})
    assert options["eval_dataset"] is eval_ds
    assert options["compute_metrics"] is compute_metrics
    assert options["metric_key"] == "accuracy"
    assert options["greater_is_better"] is True
    assert options["batch_size"] == 5
    assert options["method"] == "uniform"
    # the callback's own choice wins over the trainer's, and cook()'s over both
    cb.metric = "f1"
    options = cb._resolve_options({"method": "greedy"})
    assert options["metric"] == "f1" and "compute_metrics" not in options and options["method"] == "greedy"


def test_invalid_options_fail_early(tmp_path):
    with pytest.raises(InvalidArgumentError, match="collect"):
        SoupTrainerCallback(collect="best")
    with pytest.raises(InvalidArgumentError, match="last_k"):
        SoupTrainerCallback(last_k=2)
    with pytest.raises(InvalidArgumentError, match="last_k"):
        SoupTrainerCallback(collect="checkpoints", last_k=0)
    with pytest.raises(InvalidArgumentError, match="cook_on"):
        SoupTrainerCallback(cook_on="epoch_end")
    with pytest.raises(InvalidArgumentError, match="keep_ingredients"):
        SoupTrainerCallback(cook_on="train_end", keep_ingredients=False)
    with pytest.raises(InvalidArgumentError, match="Unknown method"):
        SoupTrainerCallback(method="greedyy")
    with pytest.raises(InvalidArgumentError, match="alhpa"):
        SoupTrainerCallback(alhpa=0.5)
    with pytest.raises(InvalidArgumentError, match="No ingredient|no ingredients_dir"):
        SoupTrainerCallback(ingredients_dir=tmp_path / "nothing").cook()


def test_metadata_file_is_plain_json(tmp_path, train_ds):
    cb = SoupTrainerCallback(ingredients_dir=tmp_path / "ingredients")
    _trainer(_args(tmp_path / "run"), train_ds, cb).train()
    (ing,) = list_ingredients(tmp_path / "ingredients")
    meta = json.loads((Path(ing.reference) / INGREDIENT_METADATA).read_text())
    assert meta["format"] == "hf_soups.ingredients" and meta["version"] == 1
    assert meta["hyperparameters"]["lr_scheduler_type"] == "linear"
    assert meta["model_class"] == "BertForSequenceClassification"


@pytest.mark.slow
def test_example_sweep_smoke(tmp_path):
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [
            sys.executable,
            str(root / "examples" / "text_classification_sweep.py"),
            "--smoke",
            "--output-dir",
            str(tmp_path),
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for row in ("best run", "uniform soup", "greedy soup"):
        assert row in out.stdout


def test_greedy_soup_follows_the_trainers_metric(tmp_path, train_ds, eval_ds):
    """method='greedy' with no metric of its own scores with the trainer's compute_metrics / metric_for_best_model."""
    cb = SoupTrainerCallback(ingredients_dir=tmp_path / "ingredients", method="greedy")
    trainer = None
    for i, lr in enumerate([1e-3, 3e-3, 1e-2]):
        args = _args(tmp_path / f"run{i}", learning_rate=lr, seed=i, metric_for_best_model="accuracy")
        trainer = _trainer(args, train_ds, cb, eval_ds=eval_ds, compute_metrics=compute_metrics)
        trainer.train()
    soup = cb.cook()
    assert soup.method == "greedy"
    states = {ing.name: read_safetensors(ing.reference) for ing in soup.ingredients}
    model = make_tiny_bert(seed=0)
    ids, labels = torch.tensor(eval_ds["input_ids"]), torch.tensor(eval_ds["labels"])

    def accuracy(state) -> float:  # the trainer's metric, computed here on the weights given
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
        with torch.no_grad():
            return float((model(input_ids=ids).logits.argmax(-1) == labels).double().mean())

    for ing in soup.ingredients:  # every ingredient was scored with the trainer's compute_metrics
        (metrics,) = ing.scores.values()
        assert metrics["accuracy"] == pytest.approx(accuracy(states[ing.name]))
    # every step of the history is replayed on independently averaged weights
    kept = replay_greedy(soup, states, accuracy)
    logged = {k: v for entry in trainer.state.log_history for k, v in entry.items() if k.startswith("soup_")}
    assert logged["soup_num_selected"] == len(kept)
    assert logged["soup_accuracy"] == pytest.approx(soup.score)


def test_soup_is_pushed_where_the_trainer_pushes(tmp_path, train_ds, hub_server):
    from huggingface_hub import HfApi

    repo_id = f"{hub_server.user}/soup-from-trainer"
    cb = SoupTrainerCallback(ingredients_dir=tmp_path / "ingredients")
    for i in range(2):
        args = _args(
            tmp_path / f"run{i}", seed=i, push_to_hub=True, hub_model_id=repo_id, hub_token=hub_server.token
        )
        _trainer(args, train_ds, cb).train()
    soup = cb.cook()
    files = HfApi(endpoint=hub_server.endpoint, token=hub_server.token).list_repo_files(repo_id)
    assert "model.safetensors" in files and "README.md" in files
    assert len(soup.ingredients) == 2
    # push_to_hub=False keeps the soup local even when the trainer pushes
    cb_local = SoupTrainerCallback(ingredients_dir=tmp_path / "ingredients", push_to_hub=False)
    cb_local.set_trainer(cb.trainer)
    assert "push_to_hub" not in cb_local._resolve_options({})


_DISTRIBUTED_SCRIPT = """
import hashlib, json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from accelerate import PartialState
from hf_soups import SoupTrainerCallback
from tests.test_callback import _args, _dataset, _trainer, compute_metrics

out = Path(sys.argv[1])
eval_ds = _dataset(24, seed=1)
cb = SoupTrainerCallback(ingredients_dir=out / "ingredients", replace_model=True)
for i in range(2):
    args = _args(out / f"run{i}", seed=i, learning_rate=3e-3 * (i + 1), ddp_backend="gloo")
    trainer = _trainer(args, _dataset(32, seed=0), cb, eval_ds=eval_ds, compute_metrics=compute_metrics)
    trainer.train()
soup = cb.cook(method="greedy", metric="accuracy")
digest = hashlib.sha256()
for name, tensor in sorted(trainer.model.state_dict().items()):
    digest.update(name.encode() + tensor.detach().float().numpy().tobytes())
state = PartialState()
record = {
    "rank": state.process_index,
    "world": state.num_processes,
    "ingredients": [i.name for i in cb.ingredients],
    "selected": [bool(i.selected) for i in soup.ingredients],
    "score": soup.score,
    "model": digest.hexdigest(),
    "logged": [e for e in trainer.state.log_history if "soup_num_ingredients" in e],
}
(out / f"rank{state.process_index}.json").write_text(json.dumps(record))
"""


@pytest.mark.slow
def test_distributed_only_the_main_process_writes(tmp_path):
    """torchrun --nproc_per_node 2 (gloo, CPU): one set of ingredients, the same soup on every rank."""
    import signal
    import socket

    root = Path(__file__).resolve().parents[1]
    script = tmp_path / "ddp_sweep.py"
    script.write_text(_DISTRIBUTED_SCRIPT)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
    ]
    command += ["--master_port", str(port), str(script), str(tmp_path), str(root)]
    log = tmp_path / "torchrun.log"
    with open(log, "w") as handle:
        proc = subprocess.Popen(
            command, cwd=root, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            returncode = proc.wait(timeout=420)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers
            proc.wait()
            pytest.fail("torchrun timed out:\n" + log.read_text()[-5000:])
    assert returncode == 0, log.read_text()[-5000:]
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in records] == [2, 2]
    # both ranks agree on the run ids (broadcast from rank 0) and see the same two ingredients
    assert records[0]["ingredients"] == records[1]["ingredients"]
    assert len(records[0]["ingredients"]) == 2
    folders = sorted(p.name for p in (tmp_path / "ingredients").iterdir() if p.is_dir())
    assert folders == sorted(records[0]["ingredients"])  # no half-written or per-rank duplicates
    # same greedy decisions, same score, same weights loaded into every rank's model
    assert records[0]["selected"] == records[1]["selected"]
    assert records[0]["score"] == records[1]["score"]
    assert records[0]["model"] == records[1]["model"]
    assert records[0]["logged"] and records[1]["logged"]


def test_the_task_vector_knobs_through_the_callback(tmp_path, train_ds, eval_ds):
    """SoupTrainerCallback(method="ties", density=, scaling=, base_model=): the soup of two Trainer runs is the
    float64 TIES of their task vectors from the model they started from; a list of methods is compared on the
    trainer's eval set; a knob no method takes is refused when the callback is made."""
    from tests.testing_common import family_reference

    base_dir = tmp_path / "base"
    make_tiny_bert(seed=0).save_pretrained(base_dir)  # what every run starts from
    with pytest.raises(InvalidArgumentError, match="alpha"):
        SoupTrainerCallback(method="ties", density=0.5, alpha=0.5)
    cb = SoupTrainerCallback(
        ingredients_dir=tmp_path / "ingredients",
        method="ties",
        density=0.4,
        scaling=1.5,
        base_model=str(base_dir),
    )
    finals = []
    for i, lr in enumerate([1e-3, 1e-2]):
        trainer = _trainer(
            _args(tmp_path / f"run{i}", learning_rate=lr, seed=10 + i), train_ds, cb, eval_ds=eval_ds
        )
        trainer.train()
        finals.append({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})
    soup = cb.cook(progress=False)
    assert soup.method == "ties" and (soup.params["density"], soup.params["scaling"]) == (0.4, 1.5)
    expected = family_reference("ties", read_safetensors(base_dir), finals, density=0.4, scaling=1.5)
    assert_state_close(soup.model.state_dict(), expected, atol=2e-6)
    # several methods, scored on the trainer's eval set (the callback's compute_metrics-free default: accuracy)
    compared = cb.cook(method=["ties", "task-arithmetic"], progress=False, metric="accuracy")
    assert [r["method"] for r in compared.comparison] == ["ties", "task-arithmetic"]
    assert all(r["score"] is not None for r in compared.comparison)
