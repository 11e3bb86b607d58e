"""What an ``output_dir`` may be: a path, or a prefix in object storage (``s3://``, ``gs://``)."""

from __future__ import annotations

import re

SCHEMES = ("s3", "gs")
URI_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")
BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")


def is_uri(output_dir: str) -> bool:
    return URI_RE.match(output_dir) is not None


def uri_problem(output_dir: str) -> str | None:
    """What is wrong with an object-storage ``output_dir``; None for a good one or a path."""
    match = URI_RE.match(output_dir)
    if match is None:
        return None
    scheme, rest = match.group(1).lower(), match.group(2)
    if scheme not in SCHEMES:
        return (f"unknown scheme '{scheme}://' (object storage: s3://BUCKET/PREFIX or "
                "gs://BUCKET/PREFIX; a local or shared-filesystem run directory: a path)")
    bucket, _, prefix = rest.partition("/")
    if "@" in bucket:  # s3://KEY:SECRET@bucket: never echoed, never stored
        return ("holds credentials before '@': a recipe is stored in plain text; set them in "
                "the environment of every node (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...)")
    if not bucket:
        return f"'{output_dir}' names no bucket (expected {scheme}://BUCKET/PREFIX)"
    if not BUCKET_RE.match(bucket):
        return f"'{bucket}' is not a valid bucket name"
    parts = prefix.rstrip("/").split("/") if prefix.rstrip("/") else []
    if any(p in ("", ".", "..") for p in parts) or "?" in rest or "#" in rest:
        return f"'{output_dir}': the prefix may hold no empty, '.' or '..' parts, no '?' or '#'"
    return None
