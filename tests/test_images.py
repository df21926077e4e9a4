"""Image eval sets and zero-shot classification of CLIP-family models: the papers' own setting.

Tiny random `CLIPModel` / `ViTForImageClassification` models and scikit-learn's digits (upsampled, with an inverted
copy as the distribution shift) are built in the tests. Every score is checked against the model's own outputs
(`CLIPModel(...).logits_per_image`, `ViTForImageClassification(...).logits`) on the processor's own output.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hf_soups import merge_models
from hf_soups.errors import EvaluationError, InvalidArgumentError
from hf_soups.evaluation import build_evaluator
from hf_soups.ingredients import Ingredient, resolve
from tests.tiny_vision import (
    DIGIT_NAMES,
    digit_dataset,
    digit_images,
    make_tiny_clip,
    make_tiny_vit,
    save_clip,
    save_vit,
    tiny_clip_processor,
    tiny_clip_tokenizer,
    tiny_vit_processor,
)

pytest.importorskip("PIL")
pytest.importorskip("sklearn")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _bound(sets, path, **kwargs):
    evaluator = build_evaluator(sets, progress=False, **kwargs)
    return evaluator.bind([resolve(Ingredient(str(path)))])


def _accuracy_and_loss(logits: torch.Tensor, labels: list[int]) -> tuple[float, float]:
    """float64, from the logits alone."""
    z = logits.double().numpy()
    y = np.asarray(labels)
    log_probs = (
        z - z.max(1, keepdims=True) - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
    )
    return float((z.argmax(1) == y).mean()), float(-log_probs[np.arange(len(y)), y].mean())


def _clip_logits(model, images, prompts) -> torch.Tensor:
    """`CLIPModel(...).logits_per_image` on the tokenizer's and the processor's own output."""
    text = tiny_clip_tokenizer()(prompts, padding=True, return_tensors="pt")
    pixels = tiny_clip_processor()(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return model(
            input_ids=text["input_ids"], attention_mask=text["attention_mask"], pixel_values=pixels
        ).logits_per_image


# ------------------------------------------------------------------------------------------ preprocessing


def test_image_preprocessing_equals_the_processors_own_output(tmp_path):
    path = save_vit(make_tiny_vit(), tmp_path / "vit")
    ds = digit_dataset(20)
    evaluator = _bound(ds, path)
    images, _ = digit_images(20)
    expected = tiny_vit_processor()(images=images, return_tensors="np")["pixel_values"]
    prepared = np.stack([ex["pixel_values"].numpy() for ex in evaluator._examples["eval"]])
    np.testing.assert_array_equal(prepared, expected)
    assert [ex["labels"] for ex in evaluator._examples["eval"]] == list(ds["label"])


def test_grey_images_are_converted_to_rgb_as_the_image_classification_example_does(tmp_path):
    from datasets import Dataset
    from PIL import Image

    path = save_vit(make_tiny_vit(), tmp_path / "vit")
    rgb, labels = digit_images(6)
    grey = [im.convert("L") for im in rgb]
    evaluator = _bound(Dataset.from_dict({"image": grey, "label": labels}), path)
    assert isinstance(grey[0], Image.Image) and grey[0].mode == "L"
    expected = tiny_vit_processor()(images=[im.convert("RGB") for im in grey], return_tensors="np")[
        "pixel_values"
    ]
    prepared = np.stack([ex["pixel_values"].numpy() for ex in evaluator._examples["eval"]])
    np.testing.assert_array_equal(prepared, expected)


def test_vit_image_classifier_scores_equal_its_own_logits(tmp_path):
    model = make_tiny_vit(noise=0.05)
    path = save_vit(model, tmp_path / "vit")
    ds, shifted = digit_dataset(30), digit_dataset(30, shift="invert")
    evaluator = _bound({"id": ds, "shifted": shifted}, path, batch_size=7)
    scores = evaluator.evaluate(model)
    for name, shift in (("id", None), ("shifted", "invert")):
        images, labels = digit_images(30, shift=shift)
        with torch.no_grad():
            logits = model(**tiny_vit_processor()(images=images, return_tensors="pt")).logits
        accuracy, loss = _accuracy_and_loss(logits, labels)
        assert scores[name]["accuracy"] == pytest.approx(accuracy, abs=1e-12)
        assert scores[name]["loss"] == pytest.approx(loss, abs=1e-5)


def test_image_processor_argument_wins_over_the_ingredients(tmp_path):
    from transformers import ViTImageProcessorPil

    path = save_vit(make_tiny_vit(), tmp_path / "vit")
    other = ViTImageProcessorPil(size={"height": 16, "width": 16}, image_mean=[0.0] * 3, image_std=[1.0] * 3)
    evaluator = _bound(digit_dataset(4), path, image_processor=other)
    expected = other(images=digit_images(4)[0], return_tensors="np")["pixel_values"]
    np.testing.assert_array_equal(evaluator._examples["eval"][0]["pixel_values"].numpy(), expected[0])


def test_no_image_processor_is_a_clear_error(tmp_path):
    path = save_vit(make_tiny_vit(), tmp_path / "vit", processor=False)
    with pytest.raises(EvaluationError, match="image_processor=") as err:
        _bound(digit_dataset(4), path)
    assert "'image'" in str(err.value) and "pixel_values" in str(err.value)


# ------------------------------------------------------------------------------------------ zero-shot


def test_zero_shot_logits_equal_clip_logits_per_image(tmp_path):
    model = make_tiny_clip()
    path = save_clip(model, tmp_path / "clip")
    ds = digit_dataset(25)
    evaluator = _bound({"id": ds}, path, templates="a photo of the digit {}.", batch_size=4)
    predictions = evaluator.predict(model)["id"]
    images, labels = digit_images(25)
    expected = _clip_logits(model, images, [f"a photo of the digit {n}." for n in DIGIT_NAMES])
    torch.testing.assert_close(torch.from_numpy(predictions.logits), expected, rtol=1e-5, atol=1e-5)
    accuracy, loss = _accuracy_and_loss(expected, labels)
    scores = evaluator.score({"id": predictions})["id"]
    assert scores["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert scores["loss"] == pytest.approx(loss, abs=1e-5)


def test_zero_shot_templates_are_averaged_per_class_as_in_the_clip_paper(tmp_path):
    model = make_tiny_clip()
    path = save_clip(model, tmp_path / "clip")
    templates = ["a photo of a {}.", "a drawing of the number {}.", "{}"]
    names = ["zero", "one", "two"]
    ds = digit_dataset(30, class_label=False).filter(lambda ex: ex["label"] < 3)
    evaluator = _bound(ds, path, class_names=names, templates=templates)
    logits = torch.from_numpy(evaluator.predict(model)["eval"].logits)

    # independent: float64 numpy, each prompt embedded alone (no padding at all)
    tok = tiny_clip_tokenizer()
    with torch.no_grad():
        classes = []
        for name in names:
            rows = []
            for t in templates:
                ids = tok(t.replace("{}", name), return_tensors="pt")["input_ids"]
                rows.append(model.get_text_features(input_ids=ids).pooler_output[0].double().numpy())
            rows = np.stack(rows)
            mean = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).mean(0)
            classes.append(mean / np.linalg.norm(mean))
        images = [ds[i]["image"] for i in range(len(ds))]
        pixels = tiny_clip_processor()(images=images, return_tensors="pt")["pixel_values"]
        img = model.get_image_features(pixel_values=pixels).pooler_output.double().numpy()
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    expected = img @ np.stack(classes).T * float(model.logit_scale.detach().exp())
    np.testing.assert_allclose(logits.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_zero_shot_string_labels_and_class_names(tmp_path):
    from datasets import Dataset

    model = make_tiny_clip()
    path = save_clip(model, tmp_path / "clip")
    images, labels = digit_images(12)
    ds = Dataset.from_dict({"image": images, "label": [DIGIT_NAMES[y] for y in labels]})
    evaluator = _bound(ds, path, class_names=DIGIT_NAMES)
    assert [ex["labels"] for ex in evaluator._examples["eval"]] == labels


def test_zero_shot_needs_class_names(tmp_path):
    path = save_clip(make_tiny_clip(), tmp_path / "clip")
    with pytest.raises(EvaluationError, match="class_names="):
        _bound(digit_dataset(4, class_label=False), path)


def test_zero_shot_labels_outside_the_class_names_are_refused(tmp_path):
    path = save_clip(make_tiny_clip(), tmp_path / "clip")
    with pytest.raises(EvaluationError, match="outside the model's 2 classes"):
        _bound(digit_dataset(10, class_label=False), path, class_names=["zero", "one"])


def test_class_names_for_a_model_with_its_own_head_is_refused(tmp_path):
    path = save_vit(make_tiny_vit(), tmp_path / "vit")
    with pytest.raises(EvaluationError, match="class_names= is for zero-shot.*ViTForImageClassification"):
        _bound(digit_dataset(4), path, class_names=DIGIT_NAMES)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("templates", "a photo", "exactly one '{}'"),
        ("templates", [], "expected a template"),
        ("class_names", ["cat"], "at least two classes"),
        ("class_names", ["cat", "cat"], "'cat' is given more than once"),
        ("class_names", "cat dog", "a list of class names"),
    ],
)
def test_bad_zero_shot_options_are_refused_by_name(key, value, message):
    ds = digit_dataset(4)
    with pytest.raises(InvalidArgumentError, match=f"{key}: .*{message}".replace("(", r"\(")):
        build_evaluator(ds, **{key: value})
    with pytest.raises(InvalidArgumentError, match=key):
        merge_models(["a", "b"], eval_dataset=ds, **{key: value})


def test_each_candidate_reembeds_the_prompts_with_its_own_text_tower(tmp_path):
    base = make_tiny_clip()
    path = save_clip(base, tmp_path / "clip")
    evaluator = _bound(digit_dataset(20), path)
    other = make_tiny_clip()
    with torch.no_grad():  # change the text tower only: the zero-shot logits must follow
        other.text_projection.weight.mul_(-1.5)
    first = evaluator.predict(base)["eval"].logits
    second = evaluator.predict(other)["eval"].logits
    images, _ = digit_images(20)
    prompts = [f"a photo of a {n}." for n in DIGIT_NAMES]
    torch.testing.assert_close(
        torch.from_numpy(second), _clip_logits(other, images, prompts), rtol=1e-5, atol=1e-5
    )
    assert not np.allclose(first, second)


# ------------------------------------------------------------------------------------------ soups


def _interpolate(base, ft, alpha):
    model = make_tiny_clip()
    b, f = base.state_dict(), ft.state_dict()
    model.load_state_dict({k: (1 - alpha) * b[k].double() + alpha * f[k].double() for k in b})
    return model.eval()


def test_wise_ft_sweep_endpoints_equal_the_ends_own_zero_shot_scores(tmp_path):
    base, ft = make_tiny_clip(), make_tiny_clip(seed=3, noise=0.05)
    base_dir, ft_dir = save_clip(base, tmp_path / "zero-shot"), save_clip(ft, tmp_path / "fine-tuned")
    sets = {"id": digit_dataset(40), "shifted": digit_dataset(40, shift="invert")}
    alphas = [0.0, 0.5, 1.0]
    soup = merge_models(
        [str(ft_dir)],
        method="wise-ft",
        base_model=str(base_dir),
        alpha=alphas,
        eval_dataset=sets,
        templates=["a photo of a {}.", "the digit {}."],
        progress=False,
    )
    assert [h["alpha"] for h in soup.history] == alphas
    evaluator = _bound(sets, base_dir, templates=["a photo of a {}.", "the digit {}."])
    for point, model in zip(soup.history, (base, _interpolate(base, ft, 0.5), ft)):
        own = evaluator.evaluate(model)
        for name in sets:
            assert point["scores"][name]["accuracy"] == own[name]["accuracy"]
            assert point["scores"][name]["loss"] == pytest.approx(own[name]["loss"], abs=1e-5)
    # the endpoints, once more from CLIPModel's own logits (one template: the model's logits_per_image)
    one = _bound(sets, base_dir)
    for model in (base, ft):
        for name, shift in (("id", None), ("shifted", "invert")):
            images, labels = digit_images(40, shift=shift)
            accuracy, _ = _accuracy_and_loss(
                _clip_logits(model, images, [f"a photo of a {n}." for n in DIGIT_NAMES]), labels
            )
            assert one.evaluate(model)[name]["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    best = max(range(3), key=lambda i: soup.history[i]["scores"]["id"]["accuracy"])
    assert soup.params["alpha"] == alphas[best]


def test_greedy_soup_of_clip_fine_tunes(tmp_path):
    paths = [save_clip(make_tiny_clip(seed=s, noise=0.03), tmp_path / f"ft{s}") for s in range(3)]
    ds = digit_dataset(40)
    soup = merge_models([str(p) for p in paths], method="greedy", eval_dataset=ds, progress=False)
    kept = [i for i in soup.ingredients if i.selected]
    assert kept and soup.score is not None
    evaluator = _bound(ds, paths[0])
    assert soup.score == evaluator.evaluate(soup.model)["eval"]["accuracy"]
    for ing in soup.ingredients:  # each ingredient's own zero-shot score
        from transformers import CLIPModel

        own = evaluator.evaluate(CLIPModel.from_pretrained(str(ing.reference)))["eval"]["accuracy"]
        assert ing.score == own


def test_vit_soups_in_memory_follow_the_tensors_transformers_renames(tmp_path):
    """transformers 5 saves ViT's `vit.layers.0.attention.q_proj` as `vit.encoder.layer.0.attention.attention.query`:
    the live model of a greedy soup (and an in-memory soup) must still receive every tensor."""
    models = [make_tiny_vit(seed=s, noise=0.05) for s in range(3)]
    paths = [str(save_vit(m, tmp_path / f"ft{s}")) for s, m in enumerate(models)]
    ds = digit_dataset(40)
    soup = merge_models(paths, method="greedy", eval_dataset=ds, progress=False)
    kept = [m for m, ing in zip(models, soup.ingredients) if ing.selected]
    states = [m.state_dict() for m in kept]
    for name, tensor in soup.model.state_dict().items():
        expected = sum(sd[name].double() for sd in states) / len(states)
        torch.testing.assert_close(tensor.double(), expected, rtol=0, atol=1e-6, msg=name)
    evaluator = _bound(ds, paths[0])
    assert soup.score == evaluator.evaluate(soup.model)["eval"]["accuracy"]
    uniform = merge_models(paths, progress=False).model.state_dict()
    for name, tensor in uniform.items():
        expected = sum(m.state_dict()[name].double() for m in models) / 3
        torch.testing.assert_close(tensor.double(), expected, rtol=0, atol=1e-6, msg=name)


def test_soup_folder_keeps_the_image_processor_and_tokenizer(tmp_path):
    from transformers import AutoImageProcessor, AutoTokenizer

    paths = [save_clip(make_tiny_clip(seed=s, noise=0.02), tmp_path / f"ft{s}") for s in range(2)]
    merge_models([str(p) for p in paths], output_dir=tmp_path / "soup", progress=False)
    assert type(AutoImageProcessor.from_pretrained(tmp_path / "soup")).__name__.startswith(
        "CLIPImageProcessor"
    )
    assert AutoTokenizer.from_pretrained(tmp_path / "soup")("a")["input_ids"]


# ------------------------------------------------------------------------------------------ entry points


def test_cli_wise_ft_sweep_on_an_image_set_and_recook_from_its_recipe(tmp_path):
    import yaml

    from tests.test_cli import hf_soups
    from tests.testing_common import assert_same_tensors

    save_clip(make_tiny_clip(), tmp_path / "zero-shot")
    save_clip(make_tiny_clip(seed=3, noise=0.05), tmp_path / "fine-tuned")
    digit_dataset(30, class_label=False).save_to_disk(tmp_path / "val")
    names = ["nought", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    result = hf_soups(
        "merge", "fine-tuned", "--base-model", "zero-shot", "--method", "wise-ft", "--alpha", "0", "0.5", "1",
        "--eval-file", "val", "--class-names", *names, "--templates", "a photo of a {}.", "the digit {}.",
        "--output-dir", "soup", "--quiet",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    written = yaml.safe_load((tmp_path / "soup" / "soup_recipe.yaml").read_text())
    assert written["class_names"] == names
    assert written["templates"] == ["a photo of a {}.", "the digit {}."]
    assert written["alpha"] == [0.0, 0.5, 1.0]
    # the scores the command recorded are the zero-shot scores of the three candidates
    evaluator = _bound(
        digit_dataset(30, class_label=False), tmp_path / "zero-shot", class_names=names,
        templates=["a photo of a {}.", "the digit {}."],
    )  # fmt: skip
    base, ft = make_tiny_clip(), make_tiny_clip(seed=3, noise=0.05)
    own = [evaluator.evaluate(m)["eval"]["accuracy"] for m in (base, _interpolate(base, ft, 0.5), ft)]
    assert written["result"]["score"] == pytest.approx(max(own), abs=1e-12)
    again = hf_soups("cook", "soup", "--output-dir", "again", "--quiet", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert_same_tensors(tmp_path / "soup", tmp_path / "again")


def test_recipe_file_carries_the_zero_shot_options(tmp_path):
    from hf_soups.publishing.recipe_file import RecipeError, RecipeFile

    (tmp_path / "proc").mkdir()
    tiny_clip_processor().save_pretrained(tmp_path / "proc")
    recipe = RecipeFile.from_dict(
        {
            "method": "uniform",
            "ingredients": ["org/a", "org/b"],
            "class_names": ["cat", "dog"],
            "templates": "a photo of a {}.",
            "image_processor": "./proc",
        },
        base_dir=tmp_path,
    )
    kwargs = recipe.to_merge_kwargs(load_data=False)
    assert kwargs["class_names"] == ["cat", "dog"] and kwargs["templates"] == ["a photo of a {}."]
    assert kwargs["image_processor"] == str(tmp_path / "proc")
    with pytest.raises(RecipeError, match=r"templates: .*exactly one '\{\}'"):
        RecipeFile.from_dict({"ingredients": ["org/a"], "templates": ["a photo"]}, base_dir=tmp_path)
    with pytest.raises(RecipeError, match="image_processor: no such file or folder"):
        RecipeFile.from_dict({"ingredients": ["org/a"], "image_processor": "./missing"}, base_dir=tmp_path)


@pytest.mark.slow
def test_callback_cooks_a_greedy_soup_of_image_classifiers_with_the_trainers_image_processor(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from hf_soups import SoupTrainerCallback

    images, labels = digit_images(64, start=100)
    pixels = tiny_vit_processor()(images=images, return_tensors="np")["pixel_values"]
    train = Dataset.from_dict({"pixel_values": list(pixels), "labels": labels}).with_format("torch")
    val = digit_dataset(40)
    cb = SoupTrainerCallback(ingredients_dir=tmp_path / "ingredients", method="greedy", eval_dataset=val)
    for i, lr in enumerate([1e-3, 3e-3]):
        args = TrainingArguments(
            output_dir=str(tmp_path / f"run{i}"), per_device_train_batch_size=16, max_steps=4, learning_rate=lr,
            save_strategy="no", eval_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True,
            use_cpu=True, seed=i,
        )  # fmt: skip
        trainer = Trainer(
            model=make_tiny_vit(),
            args=args,
            train_dataset=train,
            processing_class=tiny_vit_processor(),
            callbacks=[cb],
        )
        cb.attach(trainer)
        trainer.train()
    # the trainer's image processor, not a tokenizer, prepares the images (no preprocessor file is needed)
    for ing in cb.ingredients:
        (Path(ing.reference) / "preprocessor_config.json").unlink(missing_ok=True)
    soup = cb.cook(replace_model=False)
    evaluator = build_evaluator(val, image_processor=tiny_vit_processor(), progress=False)
    assert soup.score == evaluator.evaluate(soup.model)["eval"]["accuracy"]
    assert any(i.selected for i in soup.ingredients)


@pytest.mark.slow
def test_example_clip_wise_ft_smoke(tmp_path):
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [
            sys.executable,
            str(root / "examples" / "clip_wise_ft.py"),
            "--smoke",
            "--output-dir",
            str(tmp_path),
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"},
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [line.split() for line in out.stdout.splitlines() if line.strip()[:4] in ("0.00", "0.50", "1.00")]
    assert [float(r[0]) for r in rows] == [0.0, 0.5, 1.0]
    assert sum("chosen" in line for line in out.stdout.splitlines()) == 1
    assert (tmp_path / "soup" / "model.safetensors").is_file()
    # the soup loads with the image processor of its ingredients (transformers 5 writes processor_config.json)
    assert any(
        (tmp_path / "soup" / n).is_file() for n in ("preprocessor_config.json", "processor_config.json")
    )
