"""The package's layers, lowest first: the table `tests/test_layers.py` enforces and `docs/architecture.md` shows.

A module imports only from its own layer or lower ones, at module level and inside functions (imports under
`if TYPE_CHECKING:` never run and are exempt), and no two modules import each other, even indirectly. A
module is placed by the longest entry that names it or a package above it (`core` places `core.engine`).
This module imports nothing.
"""

LAYERS: list[tuple[str, str, tuple[str, ...]]] = [
    # (layer, its one idea, modules and packages relative to hf_soups)
    (
        "base",
        "errors, option declarations, sizes and ranks",
        ("errors", "options", "utils", "lm_eval_task", "_layers"),
    ),
    ("core", "tensors in, tensors out", ("core", "merge_ops", "kernels")),
    (
        "ingredients",
        "what a reference is, where its weights are, the ingredients-folder format",
        ("ingredients", "ingredients_folder", "loading"),
    ),
    ("adapters", "LoRA math and adapter ingredients", ("adapters",)),
    ("recipes", "coefficients: the registry and one module per recipe", ("recipes",)),
    ("config", "the one configuration, derived from the recipes' parameters", ("config",)),
    ("evaluation", "held-out scores", ("evaluation", "remote_code")),
    ("publishing", "writing down what a soup is", ("publishing",)),
    ("soup", "the result", ("soup",)),
    ("kitchen", "serving coefficients: streamed to disk, in memory, or as an adapter", ("kitchen",)),
    ("api", "the entry points: merge_models, cook_recipe", ("api",)),
    ("integrations", "the Trainer callback", ("integrations",)),
    ("demo", "the embedded demo, a user of the library (not library API)", ("demo",)),
    ("cli", "the hf-soups command (`hf-soups demo` runs the demo)", ("cli",)),
]


def layer_of(module: str) -> int | None:
    """Index in [`LAYERS`] of `module` (a dotted name under `hf_soups`, e.g. `"core.engine"`), or None."""
    best, best_len = None, -1
    for index, (_, _, entries) in enumerate(LAYERS):
        for entry in entries:
            if (module == entry or module.startswith(entry + ".")) and len(entry) > best_len:
                best, best_len = index, len(entry)
    return best
