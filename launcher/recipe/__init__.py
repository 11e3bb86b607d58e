"""The recipe: the typed, frozen schema of a run (schema.py), how a YAML file and ``--set``
overrides become one (load.py), the DeepSpeed config it resolves to (ds_config.py), and the
rule that keeps secrets out of it (secrets.py)."""

from launcher.recipe.schema import *  # noqa: F401,F403  (the sections and Recipe)
from launcher.recipe.schema import load_recipe, validate_recipe  # noqa: F401
