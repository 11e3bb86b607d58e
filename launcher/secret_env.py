"""Which environment variables hold secrets.

Their values never go into a recipe, a Ray job's runtime_env or metadata, or a log: those are
stored in plain text (run directory, checkpoints, the Ray dashboard, ``ray job list``).
"""

from __future__ import annotations

SECRET_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "PASSWD", "CREDENTIALS")
SECRETS_HELP = (
    "set it in the environment of the Ray nodes instead (on Kubernetes: a Secret, "
    "'ftlaunch k8s --secret'); see 'Secrets on the cluster' in README.md"
)


def is_secret_name(name: str) -> bool:
    """HF_TOKEN, WANDB_API_KEY, AWS_SECRET_ACCESS_KEY, DB_PASSWORD, APIKEY, ...

    Words are matched by suffix, one underscore-separated word at a time, so that
    TOKENIZERS_PARALLELISM (a setting, not a secret) passes.
    """
    return any(word.endswith(SECRET_WORDS) for word in name.upper().split("_"))
