"""Writing down what a soup is: the model card, the recipe file, the report and the Hub upload.

- [`card`](./card.py): the model card (README.md).
- [`recipe_file`](./recipe_file.py): `soup_recipe.yaml`, read and written.
- [`reporting`](./reporting.py): `Soup.report()` and `Soup.plot()`.
- [`hub`](./hub.py): `Soup.push_to_hub`.
"""
