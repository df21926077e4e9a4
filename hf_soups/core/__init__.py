"""The soup engine: tensors in, tensors out.

- [`sources`](./sources.py): lazy tensor sources (safetensors, `.bin`, state dicts) and the choice of weight files.
- [`output_dir`](./output_dir.py): who owns an output folder (the `.hf_soups` marker) and what may be replaced.
- [`plan`](./plan.py): the merge plan (`MergePlan`, `TensorPlan`) built from aligned ingredients.
- [`compat`](./compat.py): the one compatibility checker.
- [`engine`](./engine.py): `combine`, streaming one tensor at a time into a sink.

Nothing here knows about recipes, evaluation or publishing.
"""
