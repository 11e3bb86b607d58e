"""What is secret-looking: one rule for every path a value can travel.

Environment variables (``resources.env``, ``submit --env``, ``k8s --nccl-env``) and the keys of
free-form settings (``deepspeed.overrides``) are checked by name with :func:`is_secret_name`.
A secret-looking name is refused wherever its value would be written down in plain text: a
recipe, ``recipe.resolved.yaml``, ``ds_config.json``, a ConfigMap or RayJob manifest, a Ray
job's runtime_env, entrypoint or metadata, or a log. Secrets reach a job only through the
environment of the nodes it runs on (on Kubernetes: a Secret referenced by ``secretKeyRef``).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator
from typing import Any

SECRET_WORDS = (
    "TOKEN", "KEY", "SECRET", "PASSWORD", "PASSWD", "PASSPHRASE", "CREDENTIALS", "CREDENTIAL",
)  # fmt: skip
SECRETS_HELP = (
    "set it in the environment of the Ray nodes instead (on Kubernetes: a Secret, "
    "'ftlaunch k8s --secret'); see 'Secrets on the cluster' in README.md"
)
_WORD_SEPARATOR = re.compile(r"[^A-Za-z0-9]+")


def is_secret_name(name: str) -> bool:
    """HF_TOKEN, hf_token, WANDB_API_KEY, Api-Key, apiKey, AWS_SECRET_ACCESS_KEY, db.password.

    The name is split into words at anything but a letter or digit, case and Unicode
    compatibility forms (fullwidth letters) ignored. Any word that ends with TOKEN, KEY,
    SECRET, PASSWORD, ... makes the name secret (API_KEY_2 too), so TOKENIZERS_PARALLELISM
    (a setting) passes. Erring on the side of refusing: a refused name costs a rename or a
    Secret, a missed one leaks.
    """
    plain = unicodedata.normalize("NFKC", name).upper()
    return any(word.endswith(SECRET_WORDS) for word in _WORD_SEPARATOR.split(plain) if word)


def secret_key_paths(node: Any, prefix: str) -> Iterator[str]:
    """Dotted paths (``prefix.a.b``, list items as ``[i]``) of secret-looking keys in ``node``,
    through nested dicts and lists."""
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}.{key}"
            if is_secret_name(str(key)):
                yield path
            else:
                yield from secret_key_paths(value, path)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from secret_key_paths(item, f"{prefix}[{i}]")
