"""One battery for every registered recipe x tiny architecture (as peft's tests/testing_common.py does).

Every recipe in `hf_soups.recipes.available_recipes()` is cooked on every architecture of `ARCHS` and must pass
the same checks: the written soup loads with `from_pretrained` and matches the in-memory soup; the written
tensors are `sum_i c_i theta_i` computed here in float64 from the ingredients' safetensors (read with safetensors
itself, LoRA deltas rebuilt from their factors) given the coefficients the soup reports, and those coefficients
follow the recipe's definition; dtypes are preserved and a `dtype=` override is honoured; the
`soup_recipe.yaml` written beside the soup re-cooks to identical tensors; the model card names every
ingredient; no temporary folder is left; an ingredient with a NaN is refused by name.

A new recipe gets these checks by being registered; if it needs arguments (eval data, a base, its own
parameters), add one row to `RECIPE_CASES`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from hf_soups import merge_models
from hf_soups.errors import NonFiniteTensorError
from hf_soups.recipes import available_recipes, get_recipe
from tests.testing_common import (
    assert_same_tensors,
    assert_state_close,
    family_reference,
    float64_combination,
    read_safetensors,
)
from tests.tiny_models import make_tiny_bert_dir

N_INGREDIENTS = 3

# ------------------------------------------------------------------------------------------- architectures


@dataclass
class ArchSetup:
    """Tiny ingredients of one architecture, their base, and how to read them independently."""

    name: str
    ingredients: list[Path]
    base: Path
    model_class: Any
    eval_kwargs: dict[str, Any]
    theta: Callable[[Path], dict[str, torch.Tensor]] = read_safetensors  # an ingredient's full weights
    poison: Callable[[Path, Path], str] | None = None  # copies an ingredient with one NaN; returns the tensor


def _token_rows(n: int, length: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(5, 99, (n, length), generator=gen).tolist()


def _classification_eval(base: Path):
    """Rows labelled by the base model's own predictions: the ingredients are the base plus independent noise,
    so averaging them moves back towards the labels and greedy keeps more than one ingredient."""
    from datasets import Dataset
    from transformers import BertForSequenceClassification

    rows = _token_rows(16, 8, seed=7)
    with torch.no_grad():
        labels = BertForSequenceClassification.from_pretrained(base)(input_ids=torch.tensor(rows)).logits
    return {"eval_dataset": Dataset.from_dict({"input_ids": rows, "label": labels.argmax(-1).tolist()})}


def _sampled_rows(base: Path, n: int, length: int, seed: int) -> list[list[int]]:
    """Token rows sampled from the base language model (so noise-free weights score best)."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(base).eval()
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 99, (n, 1), generator=gen)
    with torch.no_grad():
        for _ in range(length - 1):
            probs = torch.softmax(model(input_ids=ids).logits[:, -1].double() * 3.0, -1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=gen)], dim=1)
    return ids.tolist()


def _poison_safetensors(src: Path, dst: Path, pick: Callable[[str], bool]) -> str:
    """Copy folder `src` to `dst` with a NaN in the first tensor whose name `pick` accepts."""
    shutil.copytree(src, dst)
    (weights,) = sorted(dst.glob("*.safetensors"))
    state = read_safetensors(dst)
    name = next(k for k in state if pick(k) and state[k].is_floating_point())
    state[name] = state[name].clone()
    state[name].view(-1)[0] = float("nan")
    save_file(state, weights, metadata={"format": "pt"})
    return name


def build_bert(root: Path) -> ArchSetup:
    from transformers import BertForSequenceClassification

    base = make_tiny_bert_dir(root / "base", noise=0.0)
    return ArchSetup(
        name="bert",
        ingredients=[make_tiny_bert_dir(root / f"ft-{i}", seed=i, noise=0.001) for i in range(N_INGREDIENTS)],
        base=base,
        model_class=BertForSequenceClassification,
        eval_kwargs=_classification_eval(base),
        poison=lambda src, dst: _poison_safetensors(src, dst, lambda k: "pooler.dense.weight" in k),
    )


def build_gpt2(root: Path) -> ArchSetup:
    """GPT-2 with tied input and output embeddings (`lm_head.weight` is not in the files)."""
    from datasets import Dataset
    from transformers import GPT2Config, GPT2LMHeadModel

    def save(folder: Path, noise: float, seed: int) -> Path:
        torch.manual_seed(1234)
        config = GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=2, n_positions=32, pad_token_id=0)
        config.architectures = ["GPT2LMHeadModel"]
        model = GPT2LMHeadModel(config).eval()
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * noise)
        assert model.lm_head.weight is model.transformer.wte.weight
        model.save_pretrained(folder)
        return folder

    base = save(root / "base", 0.0, 0)
    return ArchSetup(
        name="gpt2",
        ingredients=[save(root / f"lm-{i}", 0.05, i) for i in range(N_INGREDIENTS)],
        base=base,
        model_class=GPT2LMHeadModel,
        eval_kwargs={
            "eval_dataset": Dataset.from_dict({"input_ids": _sampled_rows(base, 12, 10, seed=3)}),
            "metric": "perplexity",
        },
        poison=lambda src, dst: _poison_safetensors(src, dst, lambda k: k.endswith("wte.weight")),
    )


def _lora_theta(base: Path) -> Callable[[Path], dict[str, torch.Tensor]]:
    """An adapter's full weights: the base's tensors plus (lora_alpha / r) * B @ A, rebuilt from the files."""

    def theta(adapter: Path) -> dict[str, torch.Tensor]:
        if not (adapter / "adapter_config.json").is_file():  # the base itself (WiSE-FT's other end)
            return read_safetensors(adapter)
        config = json.loads((adapter / "adapter_config.json").read_text())
        assert (
            not config.get("use_rslora")
            and not config.get("rank_pattern")
            and not config.get("alpha_pattern")
        )
        scaling = config["lora_alpha"] / config["r"]
        state = {k: v.double() if v.is_floating_point() else v for k, v in read_safetensors(base).items()}
        factors = read_safetensors(adapter)
        for key, a in factors.items():
            if ".lora_A." not in key:
                continue
            b = factors[key.replace(".lora_A.", ".lora_B.")]
            target = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
            state[target] = state[target] + scaling * (b.double() @ a.double())
        return state

    return theta


def build_bert_lora(root: Path) -> ArchSetup:
    """LoRA adapters (query and value, r=2) on a tiny BERT base."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertForSequenceClassification

    base = make_tiny_bert_dir(root / "base", noise=0.0)
    adapters = []
    for i in range(N_INGREDIENTS):
        model = get_peft_model(
            BertForSequenceClassification.from_pretrained(base),
            LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], init_lora_weights=False),
        )
        gen = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        model.save_pretrained(root / f"lora-{i}")
        adapters.append(root / f"lora-{i}")
    return ArchSetup(
        name="bert-lora",
        ingredients=adapters,
        base=base,
        model_class=BertForSequenceClassification,
        eval_kwargs=_classification_eval(base),
        theta=_lora_theta(base),
        poison=lambda src, dst: _poison_safetensors(src, dst, lambda k: ".lora_B." in k),
    )


ARCHS: dict[str, Callable[[Path], ArchSetup]] = {
    "bert": build_bert,
    "gpt2": build_gpt2,
    "bert-lora": build_bert_lora,
}

# ------------------------------------------------------------------------------------------------- recipes


@dataclass
class RecipeCase:
    """How the battery cooks one recipe.

    Args:
        kwargs: `merge_models` keywords beyond the ingredients, given the architecture's set-up.
        coefficients: the recipe's definition: the coefficients (ingredients, then the base when the soup has
            one) the soup must report, given the soup (for choices made on data, such as greedy's kept set).
    """

    kwargs: Callable[[ArchSetup], dict[str, Any]] = field(default=lambda arch: {})
    coefficients: Callable[[Any], list[float]] | None = None
    n_ingredients: int = N_INGREDIENTS
    reference: Callable[[ArchSetup, list[Path]], dict[str, torch.Tensor]] | None = None
    """A method that is not `sum_i c_i theta_i` (TIES, DARE, SLERP, Model Stock): its float64 soup, given the
    architecture and the ingredients cooked (`family_reference` on `arch.theta` of each)."""


def _greedy_definition(soup) -> list[float]:
    kept = [i for i in soup.ingredients if i.selected]
    assert kept, "a greedy soup keeps at least its best ingredient"
    return [1.0 / len(kept) if i.selected else 0.0 for i in soup.ingredients]


WEIGHTS = [1.0, 2.0, 5.0]
ALPHA = 0.3

RECIPE_CASES: dict[str, RecipeCase] = {
    "uniform": RecipeCase(
        kwargs=lambda arch: {"weights": WEIGHTS},
        coefficients=lambda soup: [w / sum(WEIGHTS) for w in WEIGHTS],
    ),
    "greedy": RecipeCase(kwargs=lambda arch: dict(arch.eval_kwargs), coefficients=_greedy_definition),
    "wise-ft": RecipeCase(
        kwargs=lambda arch: {"base_model": str(arch.base), "alpha": ALPHA},
        coefficients=lambda soup: [ALPHA / N_INGREDIENTS] * N_INGREDIENTS + [1.0 - ALPHA],
    ),
}


def _family_case(method: str, n: int = N_INGREDIENTS, **knobs) -> RecipeCase:
    def reference(arch: ArchSetup, models: list[Path]) -> dict[str, torch.Tensor]:
        base = arch.theta(arch.base) if method != "slerp" else None
        return family_reference(method, base, [arch.theta(p) for p in models], **knobs)

    return RecipeCase(
        kwargs=lambda arch: {"base_model": str(arch.base), **knobs}, n_ingredients=n, reference=reference
    )


TA_SCALING = 0.8
RECIPE_CASES.update(
    {
        # linear: the battery's coefficient check applies
        "task-arithmetic": RecipeCase(
            kwargs=lambda arch: {"base_model": str(arch.base), "weights": WEIGHTS, "scaling": TA_SCALING},
            coefficients=lambda soup: [TA_SCALING * w for w in WEIGHTS] + [1.0 - TA_SCALING * sum(WEIGHTS)],
        ),
        "ties": _family_case("ties", density=0.5, scaling=1.2),
        "dare-linear": _family_case("dare-linear", density=0.7, seed=3),
        "dare-ties": _family_case("dare-ties", density=0.7, seed=3, weights=[1.0, 0.5, 2.0]),
        "slerp": _family_case("slerp", n=2, t=0.4),
        "model-stock": _family_case("model-stock"),
        # learned by ingredient: its learned coefficients are reported, and the written soup is their combination
        "learned": RecipeCase(kwargs=lambda arch: {**arch.eval_kwargs, "epochs": 1}),
    }
)


def recipe_case(method: str) -> RecipeCase:
    """The table's row, or for a recipe without one: no arguments (plus `base_model` when it needs a base)."""
    if method in RECIPE_CASES:
        return RECIPE_CASES[method]
    if get_recipe(method).needs_base:
        return RecipeCase(kwargs=lambda arch: {"base_model": str(arch.base)})
    return RecipeCase()


MATRIX = [pytest.param(m, a, id=f"{m}-{a}") for m in available_recipes() for a in ARCHS]

# ------------------------------------------------------------------------------------------------ fixtures

_ARCH_CACHE: dict[str, ArchSetup] = {}
_SOUP_CACHE: dict[tuple[str, str], Any] = {}


@pytest.fixture(scope="module")
def battery_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("battery")


def arch_setup(root: Path, arch: str) -> ArchSetup:
    if arch not in _ARCH_CACHE:
        _ARCH_CACHE[arch] = ARCHS[arch](root / "ingredients" / arch)
    return _ARCH_CACHE[arch]


def cook(root: Path, method: str, arch: ArchSetup, out: Path | None, **extra):
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
    case = recipe_case(method)
    kwargs = case.kwargs(arch)
    kwargs.update(extra)
    return merge_models(
        [str(p) for p in arch.ingredients[: case.n_ingredients]],
        method=method,
        output_dir=out,
        progress=False,
        **kwargs,
    )


def cooked(root: Path, method: str, arch_name: str):
    """The soup of (method, arch), cooked once into its own parent folder and shared by the checks."""
    key = (method, arch_name)
    if key not in _SOUP_CACHE:
        arch = arch_setup(root, arch_name)
        out = root / "soups" / f"{method}-{arch_name}" / "soup"
        _SOUP_CACHE[key] = cook(root, method, arch, out)
    return _SOUP_CACHE[key], arch_setup(root, arch_name)


def expected_state(soup, arch: ArchSetup) -> dict[str, torch.Tensor]:
    """`sum_i c_i theta_i` in float64 from the reported coefficients (the base last when it has one), or the
    method's own float64 reference."""
    case = recipe_case(soup.method)
    if case.reference is not None:
        return case.reference(arch, list(arch.ingredients[: case.n_ingredients]))
    coefficients = list(soup.coefficients)
    sources = list(arch.ingredients)
    if len(coefficients) == len(sources) + 1:
        sources.append(arch.base)
    assert len(coefficients) == len(sources), (coefficients, sources)
    return float64_combination([arch.theta(p) for p in sources], coefficients)


# ------------------------------------------------------------------------------------------------- checks


@pytest.mark.parametrize(("method", "arch"), MATRIX)
def test_written_tensors_are_the_float64_combination_of_the_reported_coefficients(battery_root, method, arch):
    soup, setup = cooked(battery_root, method, arch)
    definition = recipe_case(method).coefficients
    if definition is not None:
        assert list(soup.coefficients) == pytest.approx(definition(soup), abs=1e-12)
    assert_state_close(read_safetensors(soup.output_dir), expected_state(soup, setup), atol=2e-6)


@pytest.mark.parametrize(("method", "arch"), MATRIX)
def test_written_soup_loads_with_from_pretrained_and_matches_the_in_memory_soup(battery_root, method, arch):
    """The folder loads with transformers and holds the same bits as the soup the recipe kept in memory (the one
    it scored) and as the same recipe cooked without `output_dir`."""
    soup, setup = cooked(battery_root, method, arch)
    loaded = setup.model_class.from_pretrained(soup.output_dir).eval()
    on_disk = loaded.state_dict()
    kept_live = soup._model is not None  # a recipe that evaluated keeps its live model; others load lazily
    in_memory = cook(battery_root, method, setup, None).model.state_dict()
    references = [in_memory] + ([soup.model.state_dict()] if kept_live else [])
    for reference in references:
        assert set(on_disk) == set(reference)
        for k, v in on_disk.items():
            assert v.dtype == reference[k].dtype, k
            assert torch.equal(v, reference[k]), (k, float((v.double() - reference[k].double()).abs().max()))
    if arch == "gpt2":  # the tied head is tied again, not a stale or zero copy
        assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()


@pytest.mark.parametrize(("method", "arch"), MATRIX)
def test_dtype_is_preserved_and_a_dtype_override_is_honoured(battery_root, method, arch):
    soup, setup = cooked(battery_root, method, arch)
    source = read_safetensors(setup.base)  # every ingredient and the base are float32 files
    written = read_safetensors(soup.output_dir)
    for k, v in written.items():
        assert v.dtype == source[k].dtype, k

    out = battery_root / "dtype" / f"{method}-{arch}" / "soup"
    half = cook(battery_root, method, setup, out, dtype="bfloat16")
    assert list(half.coefficients) == pytest.approx(list(soup.coefficients))
    expected = expected_state(half, setup)
    written = read_safetensors(out)
    assert written
    for k, v in written.items():
        if expected[k].is_floating_point():
            assert v.dtype == torch.bfloat16, k
            # the float32 sum rounded once to bfloat16: within one bfloat16 step of the float64 value
            torch.testing.assert_close(v.double(), expected[k], rtol=2**-7, atol=1e-6, msg=k)
        else:
            assert torch.equal(v, expected[k].to(v.dtype)), k


@pytest.mark.parametrize(("method", "arch"), MATRIX)
def test_the_written_recipe_recooks_identical_tensors(battery_root, method, arch):
    from hf_soups.api import cook_recipe
    from hf_soups.publishing.recipe_file import RECIPE_FILENAME

    soup, _ = cooked(battery_root, method, arch)
    recipe = soup.output_dir / RECIPE_FILENAME
    assert recipe.is_file()
    again = battery_root / "recooked" / f"{method}-{arch}"
    cook_recipe(recipe, output_dir=again, progress=False)
    assert_same_tensors(soup.output_dir, again)


@pytest.mark.parametrize(("method", "arch"), MATRIX)
def test_the_model_card_names_every_ingredient(battery_root, method, arch):
    soup, setup = cooked(battery_root, method, arch)
    card = (soup.output_dir / "README.md").read_text()
    for ingredient in setup.ingredients[: recipe_case(method).n_ingredients]:
        assert ingredient.name in card, ingredient.name
    if soup.base is not None:
        assert setup.base.name in card


@pytest.mark.parametrize(("method", "arch"), MATRIX)
def test_no_temporary_folder_is_left(battery_root, method, arch):
    soup, setup = cooked(battery_root, method, arch)
    parent = soup.output_dir.parent
    assert sorted(p.name for p in parent.iterdir()) == [soup.output_dir.name]
    ingredient_root = setup.base.parent
    expected = sorted([p.name for p in setup.ingredients] + [setup.base.name])
    assert sorted(p.name for p in ingredient_root.iterdir() if not p.name.startswith("diverged")) == expected


@pytest.mark.parametrize(("method", "arch"), MATRIX)
def test_an_ingredient_with_a_nan_is_refused_by_name(battery_root, method, arch):
    setup = arch_setup(battery_root, arch)
    bad = setup.base.parent / f"diverged-{method}"
    tensor = setup.poison(setup.ingredients[1], bad)
    refs = [str(setup.ingredients[0]), str(bad), str(setup.ingredients[2])][
        : recipe_case(method).n_ingredients
    ]
    out = battery_root / "nan" / f"{method}-{arch}" / "soup"
    out.parent.mkdir(parents=True)
    kwargs = recipe_case(method).kwargs(setup)
    with pytest.raises(NonFiniteTensorError) as info:
        merge_models(refs, method=method, output_dir=out, progress=False, **kwargs)
    assert info.value.ingredient == bad.name
    module = tensor.removeprefix("base_model.model.").split(".lora_")[0].removesuffix(".weight")
    assert module in info.value.tensor_name, (tensor, info.value.tensor_name)
    assert bad.name in str(info.value)
    assert list(out.parent.iterdir()) == []  # nothing written, no temporary folder left


# ---------------------------------------------------------------------------------------- defects found by the battery


def test_a_streamed_greedy_soup_of_three_is_the_scored_soup_bit_for_bit(tmp_path):
    base = make_tiny_bert_dir(tmp_path / "base", noise=0.0)
    ingredients = [make_tiny_bert_dir(tmp_path / f"ft-{i}", seed=i, noise=0.0005) for i in range(3)]
    soup = merge_models(
        [str(p) for p in ingredients],
        method="greedy",
        output_dir=tmp_path / "out" / "soup",
        progress=False,
        **_classification_eval(base),
    )
    assert all(i.selected for i in soup.ingredients)  # the set-up: greedy keeps all three
    scored = soup.model.state_dict()
    written = read_safetensors(soup.output_dir)
    for k, v in written.items():
        assert torch.equal(v, scored[k]), k
