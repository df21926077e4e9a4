"""lm-eval tasks as the metric: the live model's score against lm-eval's own `simple_evaluate`, greedy soups chosen
by it, the missing extra, `!function` behind trust_remote_code, recipe files and the CLI, the card and the report.

Every task here is a local multiple-choice YAML with json data written by the test (nothing from the network).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from hf_soups import LMEvalTask, merge_models
from hf_soups.errors import InvalidArgumentError, UntrustedCodeError
from tests.testing_common import read_safetensors, replay_greedy
from tests.tiny_models import make_tiny_llama, make_tiny_word_llama_dir, tiny_word_tokenizer

pytest.importorskip("lm_eval")

REPO = Path(__file__).resolve().parent.parent


def write_mc_task(
    folder: Path, name: str, *, rows: int = 12, seed: int = 0, version: float = 2.0, extra: str = ""
):
    """A multiple-choice lm-eval task: `name.yaml` and its json lines data (`dataset_path: json`, `data_files`)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    data = folder / f"{name}.jsonl"
    with open(data, "w") as f:
        for _ in range(rows):
            row = {
                "question": " ".join(f"w{rng.randrange(60)}" for _ in range(5)),
                "choices": [f"w{rng.randrange(60)}" for _ in range(4)],
                "label": rng.randrange(4),
            }
            f.write(json.dumps(row) + "\n")
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
        f"metadata:\n  version: {version}\n" + extra
    )
    return folder


def reference_scores(model, tasks: Path, names: list[str]) -> dict:
    """lm-eval's own path: `simple_evaluate` on an HFLM around the model object (the test's independent check)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tiny_word_tokenizer(), batch_size=4)
    out = lm_eval.simple_evaluate(
        model=lm, tasks=names, task_manager=TaskManager(include_path=str(tasks)), log_samples=False
    )
    return out


@pytest.fixture
def tasks(tmp_path):
    folder = tmp_path / "tasks"
    write_mc_task(folder, "mc_select", seed=0)
    write_mc_task(folder, "mc_heldout", seed=1, version=3.0)
    return folder


def test_lm_eval_score_of_the_live_model_is_lm_evals_own(tasks):
    from hf_soups.evaluation import build_evaluator

    evaluator = build_evaluator(
        None,
        metric=LMEvalTask(["mc_select", "mc_heldout"], include_path=tasks),
        tokenizer=tiny_word_tokenizer(),
        batch_size=4,
        device="cpu",
        progress=False,
    )
    assert evaluator.set_names == ["mc_select", "mc_heldout"]
    assert (evaluator.select_on, evaluator.metric_key, evaluator.greater_is_better) == (
        "mc_select",
        "acc",
        True,
    )
    assert evaluator.versions() == {"mc_select": 2.0, "mc_heldout": 3.0}
    accs = set()
    for seed in range(3):
        model = make_tiny_llama(seed=seed, noise=0.3)
        ours = evaluator.evaluate(model)
        theirs = reference_scores(model, tasks, ["mc_select", "mc_heldout"])["results"]
        for name in ("mc_select", "mc_heldout"):
            assert ours[name]["acc"] == pytest.approx(theirs[name]["acc,none"], abs=1e-12)
            assert ours[name]["acc_norm"] == pytest.approx(theirs[name]["acc_norm,none"], abs=1e-12)
            assert ours[name]["acc_stderr"] == pytest.approx(theirs[name]["acc_stderr,none"], rel=1e-9)
        accs.add(ours["mc_select"]["acc"])
    assert len(accs) > 1  # the three models differ: the score follows the weights
    # limit is passed through: the first 5 documents only
    limited = build_evaluator(
        None, metric=LMEvalTask("mc_select", include_path=tasks, limit=5), tokenizer=tiny_word_tokenizer()
    )
    model = make_tiny_llama(seed=1, noise=0.3)
    assert limited.evaluate(model)["mc_select"]["acc"] in {k / 5 for k in range(6)}
    assert limited.record()["tasks"]["mc_select"]["documents"] == 5


@pytest.mark.slow
def test_greedy_soup_chooses_by_the_lm_eval_score(tmp_path, tasks):
    from lm_eval.models.huggingface import HFLM  # noqa: F401  (lm-eval present: the reference below uses it)

    dirs = [make_tiny_word_llama_dir(tmp_path / f"ft-{i}", seed=i, noise=0.01) for i in range(3)]
    # fine-tunes of one init that differ enough to change answers: move each along its own direction
    for i, d in enumerate(dirs):
        model = make_tiny_llama(seed=i, noise=0.01)
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.2 * p.detach().std().clamp(min=1e-3))
        model.save_pretrained(d)
    soup = merge_models(
        dirs,
        method="greedy",
        metric=LMEvalTask(["mc_select", "mc_heldout"], include_path=tasks, num_fewshot=0),
        batch_size=4,
        device="cpu",
        progress=False,
        output_dir=tmp_path / "soup",
    )
    states = {f"ft-{i}": read_safetensors(d) for i, d in enumerate(dirs)}

    def score(state):
        model = make_tiny_llama(noise=0.0)
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
        return reference_scores(model, tasks, ["mc_select"])["results"]["mc_select"]["acc,none"]

    for ing in soup.ingredients:
        assert ing.score == pytest.approx(score(states[ing.name]))
    replay_greedy(soup, states, score)
    # both tasks are reported, with their versions, in the report, the card and the recipe
    assert set(soup.scores) == {"mc_select", "mc_heldout"}
    report = soup.report()
    card = (tmp_path / "soup" / "README.md").read_text()
    for text in (report, card):
        assert "lm-eval task mc_select (version 2.0, 0-shot, 12 documents, metric acc)" in text
        assert "lm-eval task mc_heldout (version 3.0" in text
    assert f"{soup.scores['mc_heldout']['acc']:.4f}" in card
    recipe = yaml.safe_load((tmp_path / "soup" / "soup_recipe.yaml").read_text())
    assert recipe["method"] == "greedy"  # the selection re-runs: the task brings its data
    assert recipe["metric"]["lm_eval"] == ["mc_select", "mc_heldout"]


@pytest.mark.slow
def test_recipe_file_and_cli_round_trip(tmp_path, tasks):
    for i in range(2):
        make_tiny_word_llama_dir(tmp_path / f"ft-{i}", seed=i, noise=0.01)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "method": "greedy",
                "ingredients": ["./ft-0", "./ft-1"],
                "metric": {"lm_eval": ["mc_select", "mc_heldout"], "include_path": "tasks", "limit": 8},
                "batch_size": 4,
                "device": "cpu",
            }
        )
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))

    def cli(*args: str) -> None:
        run = subprocess.run(
            [sys.executable, "-m", "hf_soups.cli", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stderr[-3000:]

    cli("cook", str(recipe), "-o", str(tmp_path / "a"))
    written = yaml.safe_load((tmp_path / "a" / "soup_recipe.yaml").read_text())
    assert written["metric"] == {
        "lm_eval": ["mc_select", "mc_heldout"],
        "metric": "acc",
        "include_path": str(tasks),
        "limit": 8,
    }
    # the written recipe cooks the same soup again; the same choice from `hf-soups merge --metric lm-eval:...`
    cli("cook", str(tmp_path / "a" / "soup_recipe.yaml"), "-o", "b")
    spec = f"lm-eval:mc_select,mc_heldout?include_path={tasks}&limit=8"
    cli(
        "merge",
        "ft-0",
        "ft-1",
        "-m",
        "greedy",
        "--metric",
        spec,
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "-o",
        "c",
    )
    results = [yaml.safe_load((tmp_path / d / "soup_recipe.yaml").read_text())["result"] for d in "abc"]
    assert results[0] == results[1] == results[2]
    a, c = read_safetensors(tmp_path / "a"), read_safetensors(tmp_path / "c")
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_function_in_a_task_yaml_needs_trust_remote_code(tmp_path):
    from hf_soups.evaluation import build_evaluator

    folder = tmp_path / "tasks"
    marker = tmp_path / "code-ran"
    write_mc_task(folder, "mc_code", extra="process_docs: !function utils.process_docs\n")
    (folder / "utils.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n\ndef process_docs(dataset):\n    return dataset\n"
    )
    (folder / "mc_child.yaml").write_text("include: mc_code.yaml\ntask: mc_child\n")
    for name in ("mc_code", "mc_child"):  # directly, and through `include:`
        with pytest.raises(UntrustedCodeError, match=r"!function utils.process_docs.*trust_remote_code=True"):
            build_evaluator(
                None, metric=LMEvalTask(name, include_path=folder), tokenizer=tiny_word_tokenizer()
            )
    assert not marker.exists()
    evaluator = build_evaluator(
        None,
        metric=LMEvalTask("mc_code", include_path=folder),
        tokenizer=tiny_word_tokenizer(),
        trust_remote_code=True,
    )
    assert marker.exists()
    assert 0.0 <= evaluator.evaluate(make_tiny_llama())["mc_code"]["acc"] <= 1.0


def test_missing_extra_names_it(tasks):
    code = (
        "import sys; sys.modules['lm_eval'] = None\n"
        "from hf_soups.evaluation import build_evaluator\n"
        f"build_evaluator(None, metric='lm-eval:mc_select?include_path={tasks}')\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode != 0
    assert "ImportError: metric=" in run.stderr and 'pip install "hf-soups[lm-eval]"' in run.stderr, (
        run.stderr
    )


def test_spellings_and_refusals(tasks):
    task = LMEvalTask(["a", "b"], metric="acc_norm", num_fewshot=2, include_path="t", limit=0.5)
    assert LMEvalTask.parse(task.spec()) == task
    assert LMEvalTask.from_dict(task.to_dict()) == task
    from hf_soups.config import SoupConfig

    config = SoupConfig.from_options({"method": "greedy", "metric": "lm-eval:mc?limit=3"})
    assert config.eval.metric == LMEvalTask("mc", limit=3)  # greedy needs eval data: the task brings it
    with pytest.raises(InvalidArgumentError, match="learned.*lm-eval"):
        SoupConfig.from_options({"method": "learned", "metric": LMEvalTask("mc")})
    with pytest.raises(InvalidArgumentError, match="eval_dataset: an lm-eval metric"):
        SoupConfig.from_options({"method": "greedy", "metric": LMEvalTask("mc"), "eval_dataset": {"a": 1}})
    with pytest.raises(InvalidArgumentError, match="num_fewshot"):
        SoupConfig.from_options({"metric": "lm-eval:mc?num_fewshot=-1"})
    with pytest.raises(InvalidArgumentError, match="unknown lm-eval key"):
        LMEvalTask.from_dict({"lm_eval": "mc", "shots": 1})
    from hf_soups.errors import EvaluationError
    from hf_soups.evaluation import build_evaluator

    with pytest.raises(EvaluationError, match="no task 'nope'"):
        build_evaluator(None, metric=LMEvalTask("nope", include_path=tasks), tokenizer=tiny_word_tokenizer())
    with pytest.raises(EvaluationError, match="has no metric 'f1'"):
        build_evaluator(None, metric=LMEvalTask("mc_select", metric="f1", include_path=tasks))
    with pytest.raises(InvalidArgumentError, match="metric_key='f1'"):
        build_evaluator(None, metric=LMEvalTask("mc_select", include_path=tasks), metric_key="f1")


@pytest.mark.slow
def test_a_task_on_a_hub_dataset_gives_eval_results_files(hub_server, tmp_path):
    """A task whose documents are a Hub dataset (here the local Hub, read by `datasets` itself) records where they
    came from: the card's model-index and the Hub's `.eval_results` file name that dataset; a local task none."""
    import uuid

    from huggingface_hub import HfApi, hf_hub_download, parse_eval_result_entries

    api = HfApi(token=hub_server.token)
    write_mc_task(tmp_path / "src", "mc_local")
    dataset_id = f"{hub_server.user}/mc-{uuid.uuid4().hex[:8]}"
    api.create_repo(dataset_id, repo_type="dataset")
    api.upload_file(
        path_or_fileobj=str(tmp_path / "src" / "mc_local.jsonl"),
        path_in_repo="test.jsonl",
        repo_id=dataset_id,
        repo_type="dataset",
    )
    yaml_text = (tmp_path / "src" / "mc_local.yaml").read_text()
    local_data = f"test: {tmp_path / 'src' / 'mc_local.jsonl'}"
    assert local_data in yaml_text
    (tmp_path / "src" / "mc_hub.yaml").write_text(
        yaml_text.replace("task: mc_local", "task: mc_hub")
        .replace("dataset_path: json", f"dataset_path: {dataset_id}")
        .replace(local_data, "test: test.jsonl")
    )
    dirs = [make_tiny_word_llama_dir(tmp_path / f"ft-{i}", seed=i, noise=0.3) for i in range(2)]
    soup = merge_models(
        dirs,
        method="greedy",
        metric=LMEvalTask(["mc_hub", "mc_local"], include_path=tmp_path / "src"),
        batch_size=4,
        device="cpu",
        progress=False,
    )
    assert soup.report_extra["eval_datasets"] == {
        "mc_hub": {
            "id": dataset_id,
            "config": None,
            "split": "test",
            "revision": None,
            "task_id": "mc_hub",
            "metric": "acc",
        }
    }  # nothing for mc_local (`dataset_path: json`): no ID is guessed
    repo = f"{hub_server.user}/soup-{uuid.uuid4().hex[:8]}"
    soup.push_to_hub(repo, token=hub_server.token)
    files = [f for f in api.list_repo_files(repo) if f.startswith(".eval_results/")]
    assert files == [f".eval_results/{dataset_id.replace('/', '__')}.yaml"]
    entries = parse_eval_result_entries(yaml.safe_load(Path(hf_hub_download(repo, files[0])).read_text()))
    assert [(e.dataset_id, e.task_id, e.value) for e in entries] == [
        (dataset_id, "mc_hub", soup.scores["mc_hub"]["acc"])
    ]
    card = Path(hf_hub_download(repo, "README.md")).read_text()
    assert f"- {dataset_id}" in card  # the card's `datasets:` metadata
