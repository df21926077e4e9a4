"""The `hf-soups` command: cook soups from recipe files or flags, inspect ingredients, run the demo.

```text
hf-soups cook recipe.yaml --output-dir my-soup            # a YAML recipe (soup_recipe.yaml re-cooks a soup)
hf-soups merge org/ft-a org/ft-b ./runs/c --output-dir s  # the same from flags
hf-soups inspect ./runs/a ./runs/b --base-model org/base  # will these soup? how far apart are they?
hf-soups demo --output-dir demo-output                    # the embedded demo (real model, real data, CPU)
```

This module is a thin shell over [`merge_models`], [`hf_soups.publishing.recipe_file`] and [`hf_soups.cli.inspect`]:
it imports only the standard library at import time, so `hf-soups --help` answers at once; torch,
transformers and datasets load when a command needs them. Exit codes: 0 success, 2 bad usage or recipe,
1 any other failure (for `inspect`: the models cannot be souped). Errors print as one line; `--debug` (or
`HF_DEBUG=1`) prints the traceback too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any

PROG = "hf-soups"
logger = logging.getLogger("hf_soups.cli")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

COOK_EXAMPLES = """\
examples:
  # cook a recipe file (relative paths in it are relative to the file)
  hf-soups cook recipe.yaml --output-dir my-soup

  # re-cook a saved soup from the recipe it carries (same tensors)
  hf-soups cook my-soup/soup_recipe.yaml --output-dir my-soup-again

  # what would it download, write and use? (nothing is done)
  hf-soups cook recipe.yaml --dry-run

  # cook and publish with a model card
  hf-soups cook recipe.yaml --push-to-hub me/my-soup --private

a minimal recipe.yaml:
  method: greedy
  ingredients: [./runs/lr-1e-5, ./runs/lr-3e-5, org/ft-c@v2]
  eval: {data: ./validation.csv, text_columns: sentence, label_column: label}
  metric: accuracy
  output_dir: ./my-soup

docs: docs/cli.md (every recipe key, with its type and meaning)
"""

MERGE_EXAMPLES = """\
examples:
  # uniform soup of local fine-tunes and Hub models, streamed to disk
  hf-soups merge ./runs/a ./runs/b org/ft-c@v2 --output-dir my-soup

  # weighted soup in bfloat16
  hf-soups merge ./runs/a ./runs/b --weights 2 1 --dtype bfloat16 --output-dir my-soup

  # greedy soup chosen on a held-out csv
  hf-soups merge ./runs/* --method greedy --eval-file val.csv --text-column sentence \\
      --label-column label --metric accuracy --output-dir my-soup

  # WiSE-FT: sweep alpha between the zero-shot model and the fine-tune, keep the best on eval
  hf-soups merge ./runs/ft --method wise-ft --base-model ./zero-shot --alpha 0 0.25 0.5 0.75 1 \\
      --eval-file val.csv --output-dir my-soup

  # print the equivalent recipe file instead of cooking
  hf-soups merge ./runs/a ./runs/b --output-dir my-soup --print-recipe > recipe.yaml
"""

INSPECT_EXAMPLES = """\
examples:
  # can these be souped? (architecture, shapes, labels, vocabularies, adapter bases)
  hf-soups inspect ./runs/a ./runs/b org/ft-c

  # how far did each fine-tune move from the shared base, and in which directions?
  hf-soups inspect ./runs/a ./runs/b --base-model google-bert/bert-base-uncased

  # machine-readable
  hf-soups inspect ./runs/a ./runs/b --json > report.json

exit status: 0 when the models can be souped together, 1 when they cannot, 2 on bad usage.
"""

DEMO_HELP = "Run the embedded demo: soups of all-MiniLM-L6-v2 fine-tunes on Rotten Tomatoes, offline, on CPU."


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32, width=110)


def _common(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output and debugging")
    group.add_argument("-q", "--quiet", action="store_true", help="Only print errors and the final result.")
    group.add_argument(
        "--debug",
        action="store_true",
        help="Verbose logs, and a full traceback on errors (also: HF_DEBUG=1).",
    )


COOK_OVERRIDES = ("output_dir", "push_to_hub", "private", "token", "trust_remote_code")
"""The options `hf-soups cook` takes as flags (everything else comes from the recipe file)."""

_GROUPS = {
    "SoupConfig": "recipe",
    "EvalConfig": "evaluation (greedy soups, WiSE-FT sweeps, reporting)",
}


def add_config_flags(
    parser: argparse.ArgumentParser, *, only: Sequence[str] | None = None, note: str = ""
) -> None:
    """Add one flag per option of the configuration (`hf_soups.config`): name, help and default come from the field.

    A field's `cli` metadata may rename the flag (`flag`), add a short form (`short`), choose its argument group
    (`group`) or pass `argparse.add_argument` settings (`nargs`, `type`, `action`, `metavar`); `cli=False` leaves it
    out. Recipe parameters say which methods take them.
    """
    from ..config import EvalConfig, SoupConfig, recipe_parameter_owners
    from ..options import option_fields
    from ..recipes import all_recipes

    owners = recipe_parameter_owners()
    sources: list[tuple[str, Any]] = [("recipe", f) for f in option_fields(SoupConfig)]
    sources += [(_GROUPS["EvalConfig"], f) for f in option_fields(EvalConfig)]
    seen = {f.name for _, f in sources}
    for recipe in all_recipes().values():
        for f in option_fields(recipe.params):
            if f.name not in seen:
                seen.add(f.name)
                sources.append(("recipe", f))
    for default_group, f in sources:
        cli = f.metadata.get("cli", True)
        if cli is False or (only is not None and f.name not in only):
            continue
        settings = dict(cli) if isinstance(cli, dict) else {}
        flag = settings.pop("flag", "--" + f.name.replace("_", "-"))
        short = settings.pop("short", None)
        group_name = settings.pop("group", default_group)
        help_text = settings.pop("help", f.metadata["help"])
        if f.name in owners:
            help_text = f"{', '.join(owners[f.name][0])}: {help_text}"
        if f.metadata.get("choices"):
            settings.setdefault("choices", f.metadata["choices"])
        if f.metadata.get("kind") == "bool" and "action" not in settings:
            settings["action"] = "store_true"
        default = f.default if f.default is not dataclasses.MISSING else None
        if default not in (None, False, True) and "default:" not in help_text:
            help_text = f"{help_text} (default: {default})"
        settings.setdefault("default", None)
        flags = [short, flag] if short else [flag]
        note_here = note if f.metadata.get("file") is not False else ""
        _group(parser, group_name).add_argument(*flags, dest=f.name, help=help_text + note_here, **settings)


def _group(parser: argparse.ArgumentParser, title: str) -> Any:
    """The parser's argument group with this title (created once)."""
    for group in parser._action_groups:
        if group.title == title:
            return group
    return parser.add_argument_group(title)


def build_parser(command: str | None = "*") -> argparse.ArgumentParser:
    """The `hf-soups` argument parser (sub-commands: cook, merge, inspect, demo).

    Args:
        command (`str`, *optional*, defaults to `"*"`): the sub-command whose option flags are built (`"*"`: all;
            `None`: none). The flags are derived from the configuration fields, which `hf-soups --help` need not
            import.
    """

    def flags(sub: argparse.ArgumentParser, name: str, **kwargs: Any) -> None:
        if command in ("*", name):
            add_config_flags(sub, **kwargs)

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Model soups for the Hugging Face ecosystem: average fine-tuned models into one better model.",
        formatter_class=_Formatter,
        epilog="Run 'hf-soups <command> --help' for a command's options and examples.",
    )
    parser.add_argument("--version", action="store_true", help="Print the hf_soups version and exit.")
    sub = parser.add_subparsers(dest="command", metavar="<command>")

    cook = sub.add_parser(
        "cook",
        help="Cook a soup from a YAML recipe file (e.g. a soup's soup_recipe.yaml).",
        description="Cook a soup from a YAML recipe file. The whole file is validated before any work starts.",
        epilog=COOK_EXAMPLES,
        formatter_class=_Formatter,
    )
    cook.add_argument("recipe", help="The recipe file, or a soup folder holding soup_recipe.yaml.")
    flags(cook, "cook", only=COOK_OVERRIDES, note=" (overrides the recipe)")
    _group(cook, "output").add_argument(
        "--dry-run",
        action="store_true",
        help="Print the plan (downloads, disk and memory needed) and exit without downloading or writing.",
    )
    _common(cook)
    cook.set_defaults(func=_cmd_cook)

    merge = sub.add_parser(
        "merge",
        help="Cook a soup from models given on the command line.",
        description="Cook a soup from models given on the command line (Hub ids with optional @revision, local "
        "folders, Trainer checkpoints, PEFT adapters).",
        epilog=MERGE_EXAMPLES,
        formatter_class=_Formatter,
    )
    merge.add_argument(
        "models", nargs="+", metavar="MODEL", help="Ingredients: Hub ids (org/name[@rev]) or folders."
    )
    merge.add_argument_group("recipe")
    ev = _group(merge, _GROUPS["EvalConfig"])
    ev.add_argument(
        "--eval-file",
        action="append",
        metavar="[NAME=]PATH",
        help="Held-out data: csv/tsv/json/jsonl/parquet file or save_to_disk folder. Repeat for several named sets.",
    )
    ev.add_argument("--split", help="Split of a saved DatasetDict.")
    flags(merge, "merge")
    out = _group(merge, "output")
    out.add_argument(
        "--print-recipe",
        action="store_true",
        help="Print the equivalent YAML recipe and exit (nothing is cooked).",
    )
    _group(merge, "output").add_argument(
        "--dry-run",
        action="store_true",
        help="Print the plan (downloads, disk and memory needed) and exit without downloading or writing.",
    )
    _common(merge)
    merge.set_defaults(func=_cmd_merge)

    inspect = sub.add_parser(
        "inspect",
        help="Check whether models can be souped and how far apart they are, without merging.",
        description="Report, without merging, whether the models can be souped (architecture, config, tensor names "
        "and shapes, label maps, vocabularies, adapter bases), which tensors differ, and how far apart the models "
        "are (L2 distances; with --base-model, the norm and cosine similarity of each model's delta). Tensors are "
        "streamed one at a time.",
        epilog=INSPECT_EXAMPLES,
        formatter_class=_Formatter,
    )
    inspect.add_argument(
        "models", nargs="+", metavar="MODEL", help="Hub ids (org/name[@rev]) or local folders."
    )
    inspect.add_argument("--base-model", help="The shared pre-trained model the deltas are measured from.")
    inspect.add_argument("--json", action="store_true", help="Print the report as JSON.")
    inspect.add_argument(
        "--no-tensors", action="store_true", help="Skip streaming the tensors (metadata checks only)."
    )
    inspect.add_argument("--top", type=int, default=5, help="How many of the most different tensors to list.")
    flags(inspect, "inspect", only=("token", "cache_dir", "revision"))
    _common(inspect)
    inspect.set_defaults(func=_cmd_inspect)

    sub.add_parser("demo", help=DEMO_HELP, add_help=False, description=DEMO_HELP)
    return parser


# ================================================================================================ helpers


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.debug else (logging.WARNING if args.quiet else logging.INFO)
    root = logging.getLogger("hf_soups")
    root.setLevel(level)
    if not any(getattr(h, "_hf_soups_cli", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter("%(message)s" if not args.debug else "%(levelname)s %(name)s: %(message)s")
        )
        handler._hf_soups_cli = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    if args.quiet:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
        try:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
        except ImportError:  # pragma: no cover
            pass


def _debug_enabled(argv: Sequence[str]) -> bool:
    return "--debug" in argv or os.environ.get("HF_DEBUG", "").strip().lower() in {"1", "true", "yes", "on"}


def _absolute(path: str | None) -> str | None:
    return os.path.abspath(os.path.expanduser(path)) if path else None


def _split_eval_file(value: str, index: int) -> tuple[str, str]:
    """`NAME=PATH` or `PATH` (named `eval` when alone, `eval_<i>` otherwise)."""
    if "=" in value and not os.path.exists(value):
        name, _, path = value.partition("=")
        if name and "/" not in name and os.sep not in name:
            return name, path
    return "", value


def merge_args_to_recipe(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe mapping that `hf-soups merge` flags stand for (paths made absolute).

    Every configuration option with a flag maps to the recipe key of the same name; only the file's own
    structure is built here (ingredients with their weights, eval sets).
    """
    from ..publishing.recipe_file import option_keys

    data: dict[str, Any] = {}
    models: list[Any] = []
    settings = getattr(args, "weights", None)  # one list per --weights: several are a weights sweep
    for values in settings or []:
        if len(values) != len(args.models):
            raise _usage(
                f"--weights: {len(values)} value(s) for {len(args.models)} model(s); give one per model"
            )
    for i, ref in enumerate(args.models):
        entry: dict[str, Any] = {"model": _absolute_if_exists(ref)}
        if settings:
            entry["weight"] = settings[0][i] if len(settings) == 1 else [values[i] for values in settings]
        models.append(entry if len(entry) > 1 else entry["model"])
    data["ingredients"] = models
    if getattr(args, "base_model", None) is not None:  # a file key (FILE_KEYS), so not among option_keys()
        data["base_model"] = _absolute_if_exists(args.base_model)
    for key in option_keys():
        value = getattr(args, key, None)
        if value is None:
            continue
        if key in ("alpha", "text_columns", "method") and isinstance(value, list) and len(value) == 1:
            value = value[0]
        elif key in ("output_dir", "cache_dir"):
            value = _absolute(value)
        elif key in ("base_model", "metric", "tokenizer", "image_processor"):
            value = _absolute_if_exists(value)
        data[key] = value
    if args.eval_file:
        sets: dict[str, dict[str, Any]] = {}
        for i, value in enumerate(args.eval_file):
            name, path = _split_eval_file(value, i)
            spec: dict[str, Any] = {"data": _absolute(path)}
            if args.split:
                spec["split"] = args.split
            sets[name or ("eval" if len(args.eval_file) == 1 else f"eval_{i}")] = spec
        data["eval"] = sets["eval"] if len(sets) == 1 and "eval" in sets else sets
    return data


def _absolute_if_exists(value: str) -> str:
    return _absolute(value) if os.path.exists(os.path.expanduser(value)) else value


class _UsageError(Exception):
    """Bad command-line usage (exit status 2)."""


def _usage(message: str) -> _UsageError:
    return _UsageError(message)


def _run_recipe(recipe: Any, args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    """Dry-run or cook a validated recipe; prints the outcome."""
    from ..publishing.recipe_file import RecipeError

    output_dir = overrides.get("output_dir", recipe.output_dir)
    push = overrides.get("push_to_hub", recipe.push_to_hub)
    if not output_dir and not push:
        raise RecipeError(
            "nothing would be written: pass --output-dir DIR or --push-to-hub REPO_ID (or set output_dir: in the recipe)"
        )
    if args.dry_run:
        from .inspect import plan_merge

        planned = recipe.with_options(output_dir=output_dir, push_to_hub=push)
        summary = plan_merge(planned, token=overrides.get("token"))
        print(summary.format())
        return EXIT_OK if summary.compatible else EXIT_FAILURE
    from ..api import cook_recipe

    if push and not output_dir:
        # stream the soup to a temporary folder and push that, rather than holding the model in memory
        import tempfile

        from ..core.output_dir import sigterm_as_interrupt

        with sigterm_as_interrupt(), tempfile.TemporaryDirectory(prefix="hf-soups-push-") as tmp:
            soup = cook_recipe(
                recipe, progress=not args.quiet, **{**overrides, "output_dir": os.path.join(tmp, "soup")}
            )
            soup.output_dir = None
            _print_soup(soup)
    else:
        soup = cook_recipe(recipe, progress=not args.quiet, **overrides)
        _print_soup(soup)
    if push:
        print(f"Pushed to the Hub: {push}")
    return EXIT_OK


def _print_soup(soup: Any) -> None:
    kept = [i for i in soup.ingredients if i.selected or (i.selected is None and (i.weight or 0) > 0)]
    lines = [f"Cooked a {soup.method} soup of {len(kept)} ingredient(s) out of {len(soup.ingredients)}."]
    if soup.params.get("alpha") is not None:
        lines.append(f"  alpha: {soup.params['alpha']}")
    for ing in soup.ingredients:
        bits = [f"weight {ing.weight:.4g}" if ing.weight is not None else None]
        if ing.score is not None:
            bits.append(f"score {ing.score:.4f}")
        if ing.selected is False:
            bits.append("left out")
        lines.append(f"  - {ing.name}" + (f" ({', '.join(b for b in bits if b)})" if any(bits) else ""))
    if soup.score is not None:
        what = soup.metric_key or "score"
        where = f" on {soup.select_on}" if soup.select_on else ""
        lines.append(f"Soup {what}{where}: {soup.score:.4f}")
    for row in soup.comparison:  # several methods compared: each one's score, the served one marked
        mark = " (served)" if row.get("selected") else ""
        lines.append(f"  method {row['method']}: {row['score']:.4f}{mark}")
    if soup.output_dir is not None:
        lines.append(
            f"Written to {soup.output_dir} (re-cook: hf-soups cook {soup.output_dir}/soup_recipe.yaml)"
        )
    print("\n".join(lines))


# ================================================================================================ commands


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The `merge_models` options given as flags that are not recipe keys (or override the recipe's)."""
    out: dict[str, Any] = {}
    if getattr(args, "output_dir", None):
        out["output_dir"] = _absolute(args.output_dir)
    for key in ("push_to_hub", "private", "token"):
        if getattr(args, key, None) is not None:
            out[key] = getattr(args, key)
    return out


def _cmd_cook(args: argparse.Namespace) -> int:
    from ..publishing.recipe_file import load_recipe

    recipe = load_recipe(args.recipe, trust_remote_code=bool(args.trust_remote_code))
    return _run_recipe(recipe, args, _overrides(args))


def _cmd_merge(args: argparse.Namespace) -> int:
    from ..publishing.recipe_file import RecipeFile

    data = merge_args_to_recipe(args)
    recipe = RecipeFile.from_dict(
        data, base_dir=os.getcwd(), source="command line", trust_remote_code=bool(args.trust_remote_code)
    )
    if args.print_recipe:
        import yaml

        print(yaml.safe_dump(recipe.to_dict(), sort_keys=False), end="")
        return EXIT_OK
    overrides = {"token": args.token} if args.token else {}
    return _run_recipe(recipe, args, overrides)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .inspect import inspect_models

    report = inspect_models(
        args.models,
        base_model=args.base_model,
        token=args.token,
        cache_dir=args.cache_dir,
        revision=args.revision,
        compare_tensors=not args.no_tensors,
        top=args.top,
        progress=not args.quiet and not args.json,
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        print(report.format())
    return EXIT_OK if report.compatible else EXIT_FAILURE


def _cmd_demo(argv: Sequence[str]) -> int:
    from ..demo import main as demo_main

    code = demo_main(list(argv))
    return int(code or 0)


# ================================================================================================ main


def _format_error(error: BaseException) -> str:
    """One line: the error's own message (ours name the ingredient, tensor and fix), or a Hub one-liner."""
    message = None
    if type(error).__module__.startswith("huggingface_hub"):
        try:
            from huggingface_hub.cli._errors import format_known_exception

            message = format_known_exception(error)  # type: ignore[arg-type]
        except ImportError:  # pragma: no cover
            message = None
    if message is None:
        message = str(error).strip() or type(error).__name__
        from ..errors import SoupError

        if not isinstance(error, (SoupError, _UsageError, OSError)):
            message = f"{type(error).__name__}: {message}"
    return " ".join(part.strip() for part in message.splitlines() if part.strip())


def _exit_code(error: BaseException) -> int:
    from ..errors import EvaluationError, InvalidArgumentError

    if isinstance(error, (_UsageError, InvalidArgumentError, EvaluationError)):
        return EXIT_USAGE
    return EXIT_FAILURE


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `hf-soups` console script.

    Args:
        argv (`Sequence[str]`, *optional*):
            Arguments without the program name (defaults to `sys.argv[1:]`).

    Returns:
        `int`: the exit status: 0 success, 2 bad usage or recipe, 1 other failure.

    Example:

    ```python
    >>> from hf_soups.cli import main
    >>> main(["merge", "./runs/a", "./runs/b", "--output-dir", "soup", "--quiet"])  # doctest: +SKIP
    0
    ```
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_enabled(argv)
    if argv and argv[0] == "demo":  # the demo parses its own arguments (hf-soups demo --help)
        command, run = "demo", (lambda: _cmd_demo(argv[1:]))
    else:
        parser = build_parser(argv[0] if argv and argv[0] in ("cook", "merge", "inspect") else None)
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # argparse: --help (0) or bad usage (2)
            return int(e.code or 0)
        if args.version:
            from .. import __version__

            print(__version__)
            return EXIT_OK
        if args.command is None:
            parser.print_help()
            return EXIT_USAGE
        _setup_logging(args)
        command, run = args.command, (lambda: args.func(args))
    try:
        return int(run())
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - every failure becomes one line and an exit status
        if debug:
            traceback.print_exc()
        print(f"{PROG} {command}: error: {_format_error(error)}", file=sys.stderr)
        if not debug:
            print("(run with --debug or HF_DEBUG=1 for the full traceback)", file=sys.stderr)
        return _exit_code(error)


if __name__ == "__main__":
    sys.exit(main())
