"""The soup's model card: metadata (validated by the local Hub's validate-yaml), body, and no network use."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.hub_server import reserve_port

reserve_port()  # no-op when conftest already did it

from huggingface_hub import ModelCard  # noqa: E402

from hf_soups.ingredients import Ingredient  # noqa: E402
from hf_soups.publishing.card import build_model_card, write_model_card  # noqa: E402
from hf_soups.soup import Soup  # noqa: E402

BERT_CONFIG = {"architectures": ["BertForSequenceClassification"], "model_type": "bert"}


def with_readme(folder: Path, metadata: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "README.md").write_text(f"---\n{metadata}\n---\n# {folder.name}\n")
    return folder


def hub_ingredient(repo_id: str, commit: str, requested: str | None = None, **kwargs) -> Ingredient:
    ing = Ingredient(repo_id, **kwargs)
    ing.metadata["requested_revision"] = requested or "main"
    ing.revision = commit
    return ing


def check_card(card: ModelCard) -> ModelCard:
    """The card passes the Hub's metadata validation and parses back strictly."""
    card.validate()  # POST /api/validate-yaml on the local Hub
    again = ModelCard(str(card))  # strict parsing (model-index included)
    assert again.data.to_dict() == card.data.to_dict()
    return again


def hub_rendered(soup: Soup) -> str:
    """The card's text as huggingface_hub renders it (`ModelCard.from_template` on the same metadata and values)."""
    from hf_soups.publishing.card import TEMPLATE_PATH, _build

    card_data, values = _build(soup, repo_id=None, directory=soup.output_dir)
    return str(ModelCard.from_template(card_data, template_path=str(TEMPLATE_PATH), **values))


def test_card_of_a_real_streamed_soup(hub_server, tiny_bert_dirs, tmp_path):
    from hf_soups import merge_models

    for folder in tiny_bert_dirs:
        with_readme(folder, "license: apache-2.0\ndatasets:\n- org/reviews\nlanguage: en")
    soup = merge_models(tiny_bert_dirs, output_dir=tmp_path / "soup", progress=False)
    readme = soup.output_dir / "README.md"
    assert readme.is_file()  # written by save before the atomic rename
    card = check_card(ModelCard.load(readme))
    data = card.data
    assert data.license == "apache-2.0"
    assert data.datasets == ["org/reviews"] and data.language == "en"
    assert data.library_name == "transformers" and data.pipeline_tag == "text-classification"
    assert {"model-soup", "merge", "uniform"} <= set(data.tags)
    assert data.base_model is None and "base_model_relation" not in data.to_dict()  # local ingredients only
    text = card.text
    assert "[Uniform soup](https://arxiv.org/abs/2203.05482)" in text
    for ing in soup.ingredients:
        assert f"| {ing.name} | local | 0.3333 |" in text
    assert "@inproceedings{wortsman2022modelsoups" in text and "@inproceedings{wortsman2022robust" in text
    assert "hf-soups cook soup_recipe.yaml" in text
    assert "AutoModelForSequenceClassification" in text
    assert "No held-out evaluation" in text
    assert soup.model_card().data.to_dict() == data.to_dict()
    # written without huggingface_hub.repocard: the text huggingface_hub's own ModelCard.from_template renders
    assert readme.read_text(encoding="utf-8") == hub_rendered(soup)
    assert soup._model is None  # the card never loads the model


def test_a_local_merge_imports_no_hub_client(tiny_bert_dirs, tmp_path):
    """Writing the card of a soup of local folders imports neither huggingface_hub's repocard nor its HTTP client
    (a visible share of a merge's time), and reads an ingredient's card metadata without them too."""
    import subprocess
    import sys

    with_readme(Path(tiny_bert_dirs[0]), "license: apache-2.0\nlanguage: en")
    code = (
        "import sys\n"
        "from hf_soups import merge_models\n"
        f"soup = merge_models({[str(d) for d in tiny_bert_dirs]!r}, output_dir={str(tmp_path / 'soup')!r}, progress=False)\n"
        "print(sorted(m for m in ('huggingface_hub.repocard', 'huggingface_hub.hf_api', 'httpx') if m in sys.modules))\n"
        "print(soup.model_card().data.language)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split("\n")
    assert out[0] == "[]"
    assert out[1] == "en"  # the ingredient's metadata reached the card


def test_in_memory_soup_save_pretrained_writes_the_card(hub_server, tiny_bert_dirs, tmp_path):
    from hf_soups import merge_models

    soup = merge_models(tiny_bert_dirs, progress=False)
    out = soup.save_pretrained(tmp_path / "saved")
    card = check_card(ModelCard.load(out / "README.md"))
    assert "model-soup" in card.data.tags
    assert (out / "soup_recipe.yaml").is_file()


@pytest.mark.parametrize(
    "licenses, expected, note",
    [
        (["mit", "mit", "mit"], "mit", None),
        (["mit", "apache-2.0", "mit"], None, "the ingredients carry different licenses"),
        # one ingredient without a license: the soup's license is unknown, not the others'
        (["mit", None, "mit"], None, "not every ingredient declares one"),
        ([None, None, None], None, "no ingredient declares one"),
    ],
)
def test_license_agreement(hub_server, tmp_path, licenses, expected, note):
    ingredients = []
    for i, lic in enumerate(licenses):
        folder = tmp_path / f"ft-{i}"
        with_readme(folder, f"license: {lic}" if lic else "tags:\n- demo")
        ingredients.append(Ingredient(str(folder), weight=1 / 3, selected=True))
    card = check_card(build_model_card(Soup("uniform", ingredients, _kitchen_config=BERT_CONFIG)))
    assert card.data.license == expected
    if note:
        assert "**License:** unknown: " + note in card.text
        listing = ", ".join(f"ft-{i}: {lic or 'none declared'}" for i, lic in enumerate(licenses))
        assert f"({listing})" in card.text  # each ingredient's license, by name
    else:
        assert "**License:**" not in card.text


def test_license_counts_the_base_too(hub_server, tmp_path):
    """WiSE-FT: the zero-shot base is an ingredient of the weights, so its license counts."""
    ingredients = [Ingredient(str(with_readme(tmp_path / "ft", "license: mit")), weight=1.0, selected=True)]
    base = Ingredient(str(with_readme(tmp_path / "zero-shot", "tags:\n- demo")))
    soup = Soup("wise-ft", ingredients, base=base, params={"alpha": 0.5}, _kitchen_config=BERT_CONFIG)
    card = check_card(build_model_card(soup))
    assert card.data.license is None
    assert "ft: mit, zero-shot: none declared" in card.text


def test_other_license_keeps_its_name(hub_server, tmp_path):
    meta = "license: other\nlicense_name: acme-research\nlicense_link: https://example.com/license"
    ingredients = [Ingredient(str(with_readme(tmp_path / f"ft-{i}", meta))) for i in range(2)]
    card = check_card(build_model_card(Soup("uniform", ingredients)))
    assert (card.data.license, card.data.license_name) == ("other", "acme-research")
    assert card.data.license_link == "https://example.com/license"


def test_hub_ingredients_card_makes_no_network_call(hub_server):
    ingredients = [
        hub_ingredient("org/ft-a", "a" * 40, requested="v2", weight=0.5, selected=True, score=0.8),
        hub_ingredient("org/ft-b", "b" * 40, weight=0.5, selected=True, score=0.7),
        hub_ingredient("org/ft-c", "c" * 40, weight=0.0, selected=False, score=0.6, name="ft | c"),
    ]
    soup = Soup("uniform", ingredients, _kitchen_config=BERT_CONFIG)
    before = len(hub_server.state.requests)
    card = build_model_card(soup, repo_id="me/soup")
    assert len(hub_server.state.requests) == before
    check_card(card)
    assert card.data.base_model == ["org/ft-a", "org/ft-b"]  # the ingredient not kept is not a parent
    assert card.data.base_model_relation == "merge"
    assert (
        "| 1 | [org/ft-a](https://huggingface.co/org/ft-a) | `aaaaaaaaaaaa` (v2) | 0.5000 | 0.8000 | yes |"
        in card.text
    )
    assert "ft \\| c" in card.text and "| no |" in card.text
    assert 'from_pretrained("me/soup")' in card.text
    assert card.text.splitlines()[1] == "# soup"


def test_evaluated_soup_has_model_index_and_comparison(hub_server, tmp_path):
    ingredients = [
        hub_ingredient("org/ft-a", "a" * 40, weight=0.5, selected=True, score=0.80),
        hub_ingredient("org/ft-b", "b" * 40, weight=0.5, selected=True, score=0.78),
    ]
    soup = Soup(
        "uniform",
        ingredients,
        score=0.83,
        scores={"validation": {"accuracy": 0.83, "f1": 0.81}, "typos": {"accuracy": 0.75}},
        metric_key="accuracy",
        select_on="validation",
        report_extra={
            "eval_datasets": {"validation": {"id": "org/reviews", "split": "validation", "name": "Reviews"}}
        },
        _kitchen_config=BERT_CONFIG,
    )
    path = write_model_card(soup, tmp_path / "out", repo_id="me/evaluated")
    assert path == tmp_path / "out" / "README.md"
    card = check_card(ModelCard.load(path))
    results = {(r.dataset_name, r.metric_type): r for r in card.data.eval_results}
    assert results[("Reviews", "accuracy")].metric_value == 0.83
    assert results[("Reviews", "accuracy")].dataset_type == "org/reviews"
    assert results[("Reviews", "accuracy")].dataset_split == "validation"
    assert results[("Reviews", "f1")].metric_value == 0.81
    assert results[("typos", "accuracy")].metric_value == 0.75
    assert results[("typos", "accuracy")].task_type == "text-classification"
    assert card.data.model_name == "evaluated"
    assert card.data.datasets == ["org/reviews"]
    assert "The soup scores **0.8300** accuracy on `validation`" in card.text
    assert "org/ft-a, scores 0.8000: the soup is better than it (+0.0300)" in card.text
    assert "| Held-out accuracy (validation) |" in card.text


def test_wise_ft_card_lists_the_base_first_and_shows_the_curve(hub_server):
    base = hub_ingredient("org/zero-shot", "d" * 40, name="org/zero-shot")
    ft = hub_ingredient("org/ft", "e" * 40, weight=1.0, selected=True, score=0.9)
    history = [
        {
            "alpha": a,
            "score": s,
            "scores": {"validation": {"accuracy": s}, "typos": {"accuracy": o}},
            "selected": a == 0.5,
        }
        for a, s, o in [(0.0, 0.6, 0.55), (0.5, 0.88, 0.7), (1.0, 0.9, 0.6)]
    ]  # the format of the sweep in recipes/wise_ft.py
    soup = Soup(
        "wise-ft", [ft], params={"alpha": 0.5}, base=base, history=history, score=0.88,
        scores={"validation": {"accuracy": 0.88}}, metric_key="accuracy", select_on="validation",
        _kitchen_config=BERT_CONFIG,
    )  # fmt: skip
    card = check_card(build_model_card(soup))
    assert card.data.base_model == ["org/zero-shot", "org/ft"]
    assert "[WiSE-FT (weight-space ensemble)](https://arxiv.org/abs/2109.01903)" in card.text
    assert "### WiSE-FT curve" in card.text
    assert (
        "| alpha | validation accuracy | typos accuracy | selected |\n| --- | --- | --- | --- |" in card.text
    )
    assert "| 0.5000 | 0.8800 | 0.7000 | yes |" in card.text
    assert "alpha chosen on the held-out accuracy among 3 values" in card.text
    assert "interpolated with the base model [org/zero-shot]" in card.text
    assert "the soup is worse than it (-0.0200)" in card.text


def test_adapter_soup_card_uses_peft(hub_server, tmp_path):
    base = hub_ingredient("org/base-model", "f" * 40)
    adapters = [hub_ingredient(f"org/lora-{i}", str(i) * 40, weight=0.5, selected=True) for i in range(2)]
    soup = Soup(
        "uniform", adapters, params={"adapter_output": "adapter"}, base=base, _kitchen_config=BERT_CONFIG
    )
    card = check_card(build_model_card(soup, repo_id="me/lora-soup"))
    assert card.data.library_name == "peft"
    assert card.data.base_model == "org/base-model" or card.data.base_model == ["org/base-model"]
    assert 'PeftModel.from_pretrained(base, "me/lora-soup")' in card.text


def test_ingredient_readme_from_the_hf_cache(hub_server, tmp_path):
    """A resolved Hub ingredient's README.md (kept in its cache snapshot) gives the card its license."""
    from huggingface_hub import HfApi

    from hf_soups.ingredients import resolve
    from tests.tiny_models import make_tiny_bert

    api = HfApi(token=hub_server.token)
    repo = api.create_repo(f"licensed-{tmp_path.name[-12:]}").repo_id
    make_tiny_bert(seed=3).push_to_hub(repo, token=hub_server.token)
    api.upload_file(path_or_fileobj=b"---\nlicense: cc-by-4.0\n---\n", path_in_repo="README.md", repo_id=repo)
    ing = Ingredient(repo, weight=1.0, selected=True)
    resolve(ing, token=hub_server.token)
    before = len(hub_server.state.requests)
    card = build_model_card(Soup("uniform", [ing], _kitchen_config=BERT_CONFIG))
    assert len(hub_server.state.requests) == before
    assert card.data.license == "cc-by-4.0"
    assert card.data.base_model == [repo]


def test_card_of_an_evaluated_greedy_soup(hub_server, tiny_bert_dirs, tmp_path):
    """merge_models with held-out data: the card carries the scores the evaluator recorded."""
    from hf_soups import merge_models
    from tests.synthetic_task import as_dataset, make_split

    ids, labels = make_split(48, seed=7)
    ood_ids, ood_labels = make_split(48, seed=8, shift=0.2)
    soup = merge_models(
        tiny_bert_dirs,
        method="greedy",
        eval_dataset={"validation": as_dataset(ids, labels), "shifted": as_dataset(ood_ids, ood_labels)},
        output_dir=tmp_path / "greedy",
        progress=False,
    )
    card = check_card(ModelCard.load(soup.output_dir / "README.md"))
    results = {(r.dataset_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results[("validation", "accuracy")] == pytest.approx(soup.scores["validation"]["accuracy"])
    assert ("shifted", "accuracy") in results
    assert "### Greedy soup steps" in card.text
    assert f"The soup scores **{soup.score:.4f}** accuracy on `validation`" in card.text
    kept = [i for i in soup.ingredients if i.selected]
    assert card.data.base_model is None and len(kept) >= 1
    for ing in soup.ingredients:
        assert f"| {ing.score:.4f} | {'yes' if ing.selected else 'no'} |" in card.text
    assert (soup.output_dir / "README.md").read_text(encoding="utf-8") == hub_rendered(soup)


def test_card_of_a_real_adapter_soup_on_a_hub_base(hub_server, tmp_path):
    """LoRA adapters trained on a Hub base, souped in adapter form: library peft, base_model = the Hub base."""
    import torch
    from huggingface_hub import HfApi
    from peft import LoraConfig, get_peft_model
    from transformers import BertForSequenceClassification

    from hf_soups import merge_models
    from tests.tiny_models import make_tiny_bert

    base_repo = HfApi(token=hub_server.token).create_repo(f"lora-base-{tmp_path.name[-10:]}").repo_id
    make_tiny_bert(noise=0).push_to_hub(base_repo, token=hub_server.token)
    adapters = []
    for i in range(2):
        model = get_peft_model(
            BertForSequenceClassification.from_pretrained(base_repo),
            LoraConfig(
                task_type="SEQ_CLS",
                r=2,
                lora_alpha=4,
                target_modules=["query", "value"],
                init_lora_weights=False,
            ),
        )
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        model.save_pretrained(tmp_path / f"lora-{i}")
        adapters.append(str(tmp_path / f"lora-{i}"))
    soup = merge_models(
        adapters,
        adapter_output="adapter",
        output_dir=tmp_path / "soup",
        token=hub_server.token,
        progress=False,
    )
    card = check_card(ModelCard.load(soup.output_dir / "README.md"))
    assert card.data.library_name == "peft"
    assert card.data.base_model in (base_repo, [base_repo])
    assert card.data.base_model_relation == "merge"
    assert card.data.pipeline_tag == "text-classification"
    assert f'base = AutoModelForSequenceClassification.from_pretrained("{base_repo}")' in card.text
