"""Learned soups: the streamed gradient against autograd through an all-in-memory soup, and what the recipe learns.

The oracle is written here, independently of hf_soups: every ingredient's state dict in memory, the soup
θ(β) = Σᵢ softmax(β_g)ᵢ θᵢ built with torch ops, the model run with `torch.func.functional_call`, and ∂L/∂β from
autograd. Ingredients are one trained tiny BERT plus noise of known scale, so a good and a ruined one are known.
"""

from __future__ import annotations

import re

import pytest
import torch

from hf_soups import merge_models
from hf_soups.errors import InvalidArgumentError
from tests.synthetic_task import add_noise, as_dataset, make_split, pretrained_model, save, trained_model
from tests.testing_common import read_safetensors


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("learned")
    ft = trained_model()
    good = [save(add_noise(ft, 1.0, seed=i), root / f"good-{i}") for i in range(2)]
    ruined = save(add_noise(ft, 12.0, seed=99), root / "ruined")
    base = save(pretrained_model(), root / "base")
    return {"good": good, "ruined": ruined, "base": base}


@pytest.fixture(scope="module")
def eval_sets():
    ids, labels = make_split(400, seed=1)
    ood_ids, ood_labels = make_split(200, seed=2, shift=0.15)
    return {"val": as_dataset(ids, labels), "ood": as_dataset(ood_ids, ood_labels)}


def _kitchen(paths, base, eval_sets):
    from hf_soups.evaluation import build_evaluator
    from hf_soups.ingredients import Ingredient, resolve
    from hf_soups.kitchen import Kitchen

    evaluator = build_evaluator(eval_sets, select_on="val", progress=False)
    resolved = [resolve(Ingredient(str(p))) for p in paths]
    resolved_base = resolve(Ingredient(str(base))) if base is not None else None
    evaluator.bind(resolved, base=resolved_base)
    return Kitchen(ingredients=resolved, base=resolved_base, evaluator=evaluator, progress=False)


def _block(name: str) -> str:
    """The test's own reading of the documented grouping, for a BERT classifier."""
    m = re.match(r"^(.*?\.\d+)\.", name)
    if m:
        return m.group(1)
    return "embeddings" if ".embeddings." in name else "head"


@pytest.mark.parametrize(("granularity", "with_base"), [("ingredient", False), ("layer", True)])
def test_streamed_gradient_equals_autograd_through_an_in_memory_soup(
    folders, eval_sets, granularity, with_base
):
    from torch.func import functional_call
    from transformers import BertForSequenceClassification

    from hf_soups.recipes.learned import StreamedMixture

    paths = [*folders["good"], folders["ruined"]]
    kitchen = _kitchen(paths, folders["base"], eval_sets)
    n_ing = len(paths)
    members = list(range(n_ing)) + ([n_ing] if with_base else [])
    mixture = StreamedMixture(kitchen.plan, kitchen.sources, members, granularity, base_is_member=with_base)
    beta = torch.randn(mixture.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    batch = kitchen.evaluator.examples()[:48]

    # streamed: one live model, its gradient, dot products read from the ingredients' files
    live = kitchen.new_live_model()
    kitchen.load_into(live, mixture.mixture(torch.softmax(beta, 1), len(kitchen.members)))
    loss, count = kitchen.evaluator.loss_sum(live, batch)
    loss.backward()
    dots = mixture.dot_products(live, [f"m{i}" for i in members]) / count
    streamed = mixture.gradient(dots, torch.softmax(beta, 1))

    # oracle: every ingredient in memory, autograd through functional_call
    states = [read_safetensors(p) for p in [*paths, *([folders["base"]] if with_base else [])]]
    model = BertForSequenceClassification.from_pretrained(paths[0]).eval()
    names = [n for n, _ in model.named_parameters()]
    groups = list(dict.fromkeys(_block(n) if granularity == "layer" else "all" for n in names))
    assert len(groups) == mixture.shape[0]
    if granularity == "layer":
        assert groups == mixture.groups
    b = beta.clone().float().requires_grad_(True)
    weights = torch.softmax(b, 1)
    params = {}
    for n in names:
        row = weights[groups.index(_block(n) if granularity == "layer" else "all")]
        params[n] = sum(row[k] * states[k][n].float() for k in range(len(states)))
    ids = torch.tensor([ex["input_ids"] for ex in batch])
    labels = torch.tensor([ex["labels"] for ex in batch])
    logits = functional_call(model, params, args=(), kwargs={"input_ids": ids}).logits
    torch.nn.functional.cross_entropy(logits, labels).backward()

    assert streamed.shape == b.grad.shape
    assert float(b.grad.abs().max()) > 1e-3  # a gradient worth comparing
    torch.testing.assert_close(streamed.float(), b.grad, rtol=2e-4, atol=2e-6)


def test_one_ingredient_gives_that_ingredient(folders, eval_sets, tmp_path):
    soup = merge_models(
        [folders["good"][0]],
        method="learned",
        eval_dataset=eval_sets,
        select_on="val",
        epochs=1,
        output_dir=tmp_path / "soup",
        progress=False,
    )
    ours, theirs = read_safetensors(tmp_path / "soup"), read_safetensors(folders["good"][0])
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name
    assert soup.ingredients[0].weight == 1.0


@pytest.mark.parametrize("granularity", ["ingredient", "layer"])
def test_rigged_pair_moves_to_the_good_ingredient_and_beats_uniform(
    folders, eval_sets, granularity, tmp_path
):
    kwargs = dict(
        method="learned",
        granularity=granularity,
        eval_dataset=eval_sets,
        select_on="val",
        learning_rate=0.2,
        progress=False,
    )
    soup = merge_models([folders["ruined"], folders["good"][0]], **kwargs)
    weights = {i.name: i.weight for i in soup.ingredients}
    assert weights["good-0"] > 0.75, weights
    uniform = soup.report_extra["baselines"]["uniform"]["scores"]
    for name in ("val", "ood"):
        assert soup.scores[name]["loss"] < uniform[name]["loss"]
    rows = soup.history
    assert len(rows) == soup.report_extra["learned"]["groups"]
    for row in rows:  # every group's coefficients are a softmax: positive, summing to one
        assert row["good-0"] > row["ruined"] > 0
        assert row["good-0"] + row["ruined"] == pytest.approx(1.0)
    learned = soup.report_extra["learned"]
    assert learned["validation_loss"]["learned"] < learned["validation_loss"]["uniform"]
    # reproducible from its seed
    again = merge_models([folders["ruined"], folders["good"][0]], **kwargs)
    assert again.history == soup.history
    text = soup.report()
    assert "Learned coefficients" in text and "good-0" in text
    card = str(soup.model_card())
    assert "Learned coefficients" in card and f"{rows[0]['good-0']:.4f}"[:5] in card
    pytest.importorskip("matplotlib")
    assert soup.plot(tmp_path / "coefficients.png").stat().st_size > 0


def test_learned_wise_ft_reports_the_base_weight(folders, eval_sets):
    soup = merge_models(
        folders["good"],
        method="learned",
        base_model=folders["base"],
        include_base=True,
        eval_dataset=eval_sets,
        select_on="val",
        epochs=1,
        progress=False,
    )
    assert soup.report_extra["learned"]["members"] == ["good-0", "good-1", "base"]
    weights = [i.weight for i in soup.ingredients] + [soup.report_extra["learned"]["base_weight"]]
    assert sum(weights) == pytest.approx(1.0)
    assert soup.params["include_base"] is True


def test_fixed_budget_without_validation_split(folders, eval_sets):
    soup = merge_models(
        [folders["ruined"], folders["good"][0]],
        method="learned",
        eval_dataset=eval_sets,
        select_on="val",
        validation_fraction=0,
        epochs=2,
        accumulation_steps=100,
        progress=False,
    )
    learned = soup.report_extra["learned"]
    # 320 + 80 examples in batches of 32: 13 batches, one step per epoch with 100 batches per step
    assert learned["steps"] == learned["best_step"] == 2
    assert learned["validation_examples"] == 0 and learned["train_examples"] == 400


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({}, "eval_dataset"),
        ({"eval_dataset": True, "include_base": True}, "include_base"),
        ({"eval_dataset": True, "learning_rate": 0.0}, "learning_rate"),
        ({"eval_dataset": True, "validation_fraction": 1.0}, "validation_fraction"),
        ({"eval_dataset": True, "granularity": "block"}, "granularity"),
        ({"eval_dataset": True, "granularity": "layer", "adapter_output": "adapter"}, "adapter_output"),
    ],
)
def test_bad_options_are_refused_before_any_work(options, named):
    from hf_soups.config import SoupConfig

    opts = dict(options)
    if opts.get("eval_dataset") is True:
        opts["eval_dataset"] = None
        has_eval = True
    else:
        has_eval = False
    with pytest.raises(InvalidArgumentError, match=named):
        SoupConfig.from_options({"method": "learned", **opts}, has_eval=has_eval)


def test_layer_groups_follow_the_module_path_up_to_the_layer_index():
    from hf_soups.recipes.learned import layer_groups

    names = [
        "transformer.wte.weight",
        "transformer.wpe.weight",
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.11.mlp.c_fc.bias",
        "transformer.ln_f.weight",
        "lm_head.weight",
        "model.embed_tokens.weight",
        "model.layers.3.self_attn.q_proj.weight",
        "vision_model.encoder.layers.0.mlp.fc1.weight",
        "text_model.encoder.layers.0.mlp.fc1.weight",
        "logit_scale",
    ]
    assert layer_groups(names) == [
        "embeddings",
        "embeddings",
        "transformer.h.0",
        "transformer.h.11",
        "head",
        "head",
        "embeddings",
        "model.layers.3",
        "vision_model.encoder.layers.0",
        "text_model.encoder.layers.0",
        "head",
    ]


def test_compared_with_greedy_and_uniform_on_one_live_model(folders, eval_sets):
    soup = merge_models(
        [folders["ruined"], *folders["good"]],
        method=["uniform", "greedy", "learned"],
        eval_dataset=eval_sets,
        select_on="val",
        epochs=2,
        learning_rate=0.2,
        progress=False,
    )
    rows = {row["method"]: row for row in soup.comparison}
    assert set(rows) == {"uniform", "greedy", "learned"}
    assert rows["learned"]["scores"]["val"]["loss"] < rows["uniform"]["scores"]["val"]["loss"]


def test_layer_soup_written_is_the_float64_combination_of_its_coefficient_table(folders, eval_sets, tmp_path):
    paths = [folders["ruined"], *folders["good"]]
    soup = merge_models(
        paths,
        method="learned",
        granularity="layer",
        base_model=folders["base"],
        include_base=True,
        eval_dataset=eval_sets,
        select_on="val",
        epochs=1,
        learning_rate=0.3,
        output_dir=tmp_path / "soup",
        progress=False,
    )
    table = {row["group"]: row for row in soup.history}
    members = [p.name for p in paths] + ["base"]
    states = [read_safetensors(p) for p in [*paths, folders["base"]]]
    written = read_safetensors(tmp_path / "soup")
    in_memory = soup.model.state_dict()
    for name, value in written.items():
        if not value.is_floating_point():
            continue
        row = table[_block(name)]
        expected = sum(row[m] * states[k][name].double() for k, m in enumerate(members))
        torch.testing.assert_close(value.double(), expected, rtol=0, atol=2e-6, msg=name)
        assert torch.equal(value, in_memory[name]), name  # the scored soup is the written one
    assert len({round(row["base"], 6) for row in soup.history}) > 1  # the groups learned apart


def test_adapter_soup_learned_by_ingredient_in_adapter_form(tmp_path, eval_sets):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import BertForSequenceClassification

    base_dir = save(pretrained_model(), tmp_path / "base")
    adapters = []
    for seed, scale in ((1, 0.05), (2, 3.0)):  # a mild adapter and a ruined one
        model = get_peft_model(
            BertForSequenceClassification.from_pretrained(base_dir),
            LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], init_lora_weights=False),
        )
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=gen) * scale)
        model.save_pretrained(tmp_path / f"lora-{seed}")
        adapters.append(tmp_path / f"lora-{seed}")
    soup = merge_models(
        [str(a) for a in adapters],
        method="learned",
        eval_dataset=eval_sets,
        select_on="val",
        epochs=2,
        learning_rate=0.3,
        adapter_output="adapter",
        output_dir=tmp_path / "soup",
        progress=False,
    )
    weights = [i.weight for i in soup.ingredients]
    assert weights[0] > weights[1]
    # the adapter written is the exact soup of the deltas: it scores what the recipe scored
    model = PeftModel.from_pretrained(
        BertForSequenceClassification.from_pretrained(base_dir), soup.output_dir
    )
    ids = torch.tensor(eval_sets["val"]["input_ids"])
    labels = torch.tensor(eval_sets["val"]["label"])
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model.eval()(input_ids=ids).logits, labels)
    assert float(loss) == pytest.approx(soup.scores["val"]["loss"], rel=1e-4)


@pytest.mark.slow
def test_learned_merge_from_flags_recooks_the_same_soup_from_its_recipe(tmp_path):
    """The CLI takes the learned soup's flags; its recipe carries the eval data and the seed, so `cook` learns the
    same coefficients again and writes the same bits."""
    import csv

    import yaml

    from tests import synthetic_task as task
    from tests.test_cli import hf_soups
    from tests.testing_common import assert_same_tensors

    trained = task.trained_model()
    folders = []
    for i, scale in enumerate([0.5, 3.0]):
        folder = task.save(task.add_noise(trained, scale, seed=i), tmp_path / f"ft-{i}")
        task.tiny_tokenizer().save_pretrained(folder)
        folders.append(folder)
    ids, labels = task.make_split(96, seed=7)
    with open(tmp_path / "val.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(zip(task.ids_to_text(ids), labels.tolist()))
    result = hf_soups(
        "merge", *[str(f) for f in folders], "--method", "learned", "--granularity", "layer", "--epochs", "2",
        "--learning-rate", "0.2", "--eval-file", "val.csv", "--text-column", "text", "--output-dir", "soup",
        "--quiet",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    written = yaml.safe_load((tmp_path / "soup" / "soup_recipe.yaml").read_text())
    assert written["method"] == "learned" and written["granularity"] == "layer" and written["epochs"] == 2
    assert written["seed"] == 0 and "eval" in written
    again = hf_soups("cook", "soup", "--output-dir", "again", "--quiet", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert_same_tensors(tmp_path / "soup", tmp_path / "again")


def test_in_memory_eval_freezes_a_learned_soup_by_ingredient_to_its_weights(folders, eval_sets, tmp_path):
    from hf_soups.api import cook_recipe

    soup = merge_models(
        [folders["ruined"], folders["good"][0]],
        method="learned",
        eval_dataset=eval_sets,
        select_on="val",
        epochs=1,
        learning_rate=0.2,
        output_dir=tmp_path / "soup",
        progress=False,
    )
    import yaml

    written = yaml.safe_load((tmp_path / "soup" / "soup_recipe.yaml").read_text())
    assert written["method"] == "uniform"
    assert [e["weight"] for e in written["ingredients"]] == soup.params["weights"]
    cook_recipe(tmp_path / "soup" / "soup_recipe.yaml", output_dir=tmp_path / "again", progress=False)
    from tests.testing_common import assert_same_tensors

    assert_same_tensors(tmp_path / "soup", tmp_path / "again")


def test_the_callback_takes_the_learned_soups_options(tmp_path):
    from hf_soups import SoupTrainerCallback

    cb = SoupTrainerCallback(
        ingredients_dir=tmp_path / "ingredients", method="learned", granularity="layer", epochs=2
    )
    assert cb is not None
    with pytest.raises(InvalidArgumentError, match="granularity"):
        SoupTrainerCallback(ingredients_dir=tmp_path / "other", method="learned", granularity="block")
