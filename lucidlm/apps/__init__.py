"""Recipes and apps on top of the library: the ``lucidlm`` command (cli*.py), the demos, the benchmarks and the
run recipes (train_recipes.py, probe_recipes.py). Nothing in the library imports from here (docs/ARCHITECTURE.md,
"Floors"; tests/test_import_floors.py)."""
