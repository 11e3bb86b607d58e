"""The recipe: the typed, frozen sections of a run (sections.py), the Recipe and task enum
(schema.py), how a YAML file and ``--set`` overrides become one (load.py), the DeepSpeed config
it resolves to (ds_config.py), and the rule that keeps secrets out of it (secrets.py)."""

from launcher.recipe.load import load_recipe, validate_recipe  # noqa: F401
from launcher.recipe.schema import (  # noqa: F401
    ADAPTER_METHODS,
    ADAPTER_SECTIONS,
    TASK_FORMATS,
    TASK_NAMES,
    TASKS,
    Recipe,
    TaskKind,
)
from launcher.recipe.run_sections import *  # noqa: F401,F403  (every section)
from launcher.recipe.sections import *  # noqa: F401,F403
