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

SECRET_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "PASSWD", "PASSPHRASE", "CREDENTIALS",
                "CREDENTIAL")  # a name's last word ending with one of these is secret
ALWAYS_SECRET = ("SECRET", "PASSWORD", "PASSWD", "PASSPHRASE", "CREDENTIAL")  # at any word
# The word before TOKEN or KEY that names a tokenizer's token or a lookup key, not a secret.
PLAIN_QUALIFIERS = frozenset({
    "PAD", "EOS", "BOS", "UNK", "SEP", "CLS", "MASK", "START", "END", "STOP", "SPECIAL", "EOT",
    "IMAGE", "AUDIO", "VIDEO", "DECODER", "SORT", "CACHE", "LABEL", "PRIMARY", "FOREIGN",
    "DICT", "MAP", "HASH", "GROUP", "PARTITION", "SHARD", "METRIC", "COLUMN", "FIELD", "LOOKUP",
    "INDEX", "JOIN", "ROUTING", "SEED", "RNG", "MONITOR", "INPUT", "OUTPUT", "TEXT", "PROMPT",
    "RESPONSE", "MESSAGE", "MESSAGES", "ROLE", "CONTENT", "STATE", "DATASET", "CONFIG",
})  # fmt: skip
SECRETS_HELP = (
    "set it in the environment of the Ray nodes instead (on Kubernetes: a Secret, "
    "'ftlaunch k8s --secret'); see 'Secrets on the cluster' in README.md"
)
_WORD_SEPARATOR = re.compile(r"[^A-Za-z0-9]+")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def is_secret_name(name: str) -> bool:
    """HF_TOKEN, hf_token, WANDB_API_KEY, Api-Key, apiKey, AWS_SECRET_ACCESS_KEY, db.password.

    The name is split into words at anything but a letter or digit and at a lower-to-upper
    case change (apiKey), case and Unicode compatibility forms (fullwidth letters) ignored,
    trailing number words dropped (API_KEY_2). Secret: any word holding SECRET, PASSWORD,
    PASSWD, PASSPHRASE or CREDENTIAL; or a last word ending with TOKEN or KEY (apikey too),
    unless the word before names a tokenizer's token or a lookup key (pad_token, sort_key).
    A word inside the name does not count (token_budget, layer_token_lr_schedule,
    TOKENIZERS_PARALLELISM, max_tokens). Erring on the side of refusing: a refused name costs
    a rename or a Secret, a missed one leaks.
    """
    plain = _CAMEL.sub("_", unicodedata.normalize("NFKC", name))
    words = [w for w in _WORD_SEPARATOR.split(plain.upper()) if w]
    while words and words[-1].isdigit():
        words.pop()
    if not words:
        return False
    if any(secret in word for word in words for secret in ALWAYS_SECRET):
        return True
    if not words[-1].endswith(SECRET_WORDS):
        return False
    return not (len(words) > 1 and words[-1] in ("TOKEN", "KEY") and words[-2] in PLAIN_QUALIFIERS)


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
