"""The Hub round trip: pull ingredients by `org/name@revision`, cook a soup, push it, load it back.

1. every ingredient is pulled at the revision given (a tag, a branch or a commit; `main` when none), and only
   the files a soup needs are downloaded (configs, weights, tokenizer; never optimizer states);
2. the soup is cooked (uniform by default; `--method greedy --eval-file val.csv` keeps only the ingredients
   that help on held-out data) and streamed to `--output-dir`;
3. it is pushed to `--push-to` in one commit: weights, config, tokenizer, a model card that names every
   ingredient at its resolved commit, and `soup_recipe.yaml`, which re-cooks it bit for bit;
4. the pushed commit is loaded back with `from_pretrained(repo, revision=commit)` and compared, tensor by
   tensor, with the local soup.

The Hub is https://huggingface.co unless `--endpoint` names another Hub-compatible server (a private Hub, or
the local test server of hf_soups' test suite, which runs this script offline in seconds). The token is
`--token`, else `HF_TOKEN` or the stored `hf auth login`; pushing needs write access to `--push-to`.

    python examples/push_to_hub_workflow.py my-org/ft-lr1e-5@v1 my-org/ft-lr3e-5@v1 my-org/ft-lr1e-4@main \\
        --push-to my-user/my-soup
    python examples/push_to_hub_workflow.py my-org/ft-a my-org/ft-b my-org/ft-c --method greedy \\
        --eval-file validation.csv --text-column sentence --push-to my-user/my-greedy-soup --private
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("ingredients", nargs="+", metavar="ORG/NAME[@REVISION]", help="fine-tunes on the Hub")
    parser.add_argument("--push-to", required=True, metavar="REPO_ID", help="the soup's repository (created)")
    parser.add_argument("--method", default="uniform", help="uniform, greedy, ... (greedy needs --eval-file)")
    parser.add_argument("--eval-file", default=None, help="held-out csv/json/jsonl/parquet for greedy soups")
    parser.add_argument("--text-column", nargs="+", default=None, help="text column(s) of --eval-file")
    parser.add_argument("--label-column", default=None, help="label column of --eval-file (default: label)")
    parser.add_argument("--output-dir", default="hub-soup", help="the local copy of the soup")
    parser.add_argument("--private", action="store_true", help="create the soup's repository as private")
    parser.add_argument("--endpoint", default=None, help="Hub URL (default: HF_ENDPOINT or huggingface.co)")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the stored login)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.endpoint:  # huggingface_hub reads HF_ENDPOINT once, when it is imported: set it first
        os.environ["HF_ENDPOINT"] = args.endpoint.rstrip("/")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    started = time.perf_counter()

    import torch
    import transformers
    from huggingface_hub import HfApi
    from safetensors.torch import load_file

    from hf_soups import merge_models

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    api = HfApi(token=args.token)
    print(f"Hub: {api.endpoint}")

    eval_dataset = None
    if args.eval_file:
        from datasets import load_dataset

        suffix = Path(args.eval_file).suffix.lstrip(".")
        builder = {"jsonl": "json", "tsv": "csv"}.get(suffix, suffix)
        options = {"delimiter": "\t"} if suffix == "tsv" else {}
        eval_dataset = {
            "validation": load_dataset(builder, data_files=args.eval_file, split="train", **options)
        }

    # ---- 1-3: pull at the given revisions, cook, stream to disk, push in one commit
    soup = merge_models(
        args.ingredients,
        method=args.method,
        eval_dataset=eval_dataset,
        text_columns=args.text_column,
        label_column=args.label_column,
        output_dir=args.output_dir,
        push_to_hub=args.push_to,
        private=args.private or None,
        token=args.token,
        progress=False,
    )
    print(f"Pulled {len(soup.ingredients)} ingredients:")
    for ref, ing in zip(args.ingredients, soup.ingredients):
        kept = "" if ing.selected is not False else "  (left out by greedy)"
        score = f"  validation {soup.metric_key} {ing.score:.4f}" if ing.score is not None else ""
        print(f"  {ref:<40} -> commit {ing.revision}{score}{kept}")
    if soup.score is not None:
        print(f"Soup: {soup.method}, validation {soup.metric_key} {soup.score:.4f}")
    commit = api.model_info(args.push_to).sha
    files = sorted(api.list_repo_files(args.push_to, revision=commit))
    print(f"Pushed {args.push_to} at commit {commit}: {', '.join(files)}")

    # ---- 4: load the pushed commit back, as anyone would, and compare it with the local soup
    config = transformers.AutoConfig.from_pretrained(args.push_to, revision=commit, token=args.token)
    model_class = getattr(transformers, config.architectures[0])
    reloaded = model_class.from_pretrained(args.push_to, revision=commit, token=args.token).state_dict()
    local: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(args.output_dir).glob("*.safetensors")):
        local.update(load_file(shard))
    differing = [name for name, tensor in local.items() if not torch.equal(tensor, reloaded[name])]
    if differing:
        raise SystemExit(f"The soup loaded from the Hub differs from the local soup in {differing[:5]}")
    print(
        f"Loaded back with {model_class.__name__}.from_pretrained({args.push_to!r}, revision={commit[:12]!r}): "
        f"{len(local)} tensors, identical to the local soup in {args.output_dir}."
    )
    seconds = time.perf_counter() - started
    print(f"Done in {seconds:.0f} s. Re-cook it anywhere: hf-soups cook {args.output_dir}/soup_recipe.yaml")
    return {
        "commit": commit,
        "files": files,
        "ingredient_commits": [ing.revision for ing in soup.ingredients],
        "kept": [ing.name for ing in soup.ingredients if ing.selected is not False],
        "tensors": len(local),
        "seconds": seconds,
    }


if __name__ == "__main__":
    main()
