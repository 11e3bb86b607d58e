"""An ``output_dir`` on object storage (``s3://bucket/prefix``, ``gs://bucket/prefix``).

The store is reached through pyarrow's filesystems (``pyarrow.fs.FileSystem.from_uri``, what
Ray Train's ``storage_path`` accepts too). Credentials and the endpoint come from the
environment of each process (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_ENDPOINT_URL``, ``GOOGLE_APPLICATION_CREDENTIALS``, ...), never from the recipe, and
are never written down. Each machine works in a node-local mirror of the run directory
(:func:`mirror_dir`); the store holds what must outlive the machine.

Objects are written and read whole through pyarrow's streams (a local file to an object and
back): an object appears only once its upload completed, so a reader sees the whole file or
none, and a failed upload raises.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from launcher.recipe.output_dir import URI_RE, is_uri

CHUNK = 8 << 20

def store_for(output_dir: str) -> Store | None:
    """The store of an object-storage ``output_dir``; None for a path."""
    return Store(output_dir.rstrip("/")) if is_uri(output_dir) else None


def mirror_dir(output_dir: str) -> Path:
    """The node-local run directory of an object-storage run: under ftlaunch's cache
    (``FTLAUNCH_CACHE``, default ``~/.cache/ftlaunch``), named by the URI, the same path on
    every machine that has the same cache root."""
    root = Path(os.environ.get("FTLAUNCH_CACHE", Path.home() / ".cache" / "ftlaunch"))
    uri = output_dir.rstrip("/")
    slug = re.sub(r"[^A-Za-z0-9]+", "-", URI_RE.match(uri).group(2)).strip("-")[-60:]
    digest = hashlib.sha256(uri.encode()).hexdigest()[:12]
    return root / "runs" / f"{slug}-{digest}"


def local_run_dir(output_dir: str) -> Path:
    """Where this machine reads and writes the run: the path itself, or the store's mirror."""
    return mirror_dir(output_dir) if is_uri(output_dir) else Path(output_dir)


@dataclass(frozen=True)
class Store:
    """One run's prefix in a bucket; paths below it are POSIX and relative."""

    uri: str

    @cached_property
    def _fs_and_root(self) -> tuple[Any, str]:
        from pyarrow.fs import FileSystem

        # S3: an object smaller than one part goes up in a single PutObject request.
        options = "?allow_delayed_open=true" if self.uri.lower().startswith("s3://") else ""
        return FileSystem.from_uri(self.uri + options)

    @property
    def fs(self) -> Any:
        return self._fs_and_root[0]

    def key(self, rel: str = "") -> str:
        root = self._fs_and_root[1].rstrip("/")
        return f"{root}/{rel}" if rel else root

    def where(self, rel: str = "") -> str:
        return f"{self.uri}/{rel}" if rel else self.uri

    def listing(self, rel: str) -> dict[str, int]:
        """Every object below ``rel``, by its path relative to ``rel``, with its size."""
        from pyarrow.fs import FileSelector, FileType

        base = self.key(rel)
        infos = self.fs.get_file_info(FileSelector(base, recursive=True, allow_not_found=True))
        return {
            info.path[len(base) + 1:]: info.size for info in infos if info.type == FileType.File
        }

    def children(self, rel: str) -> list[str]:
        """The names directly below ``rel`` (objects and folders)."""
        from pyarrow.fs import FileSelector

        infos = self.fs.get_file_info(FileSelector(self.key(rel), allow_not_found=True))
        return sorted(info.base_name for info in infos)

    def exists(self, rel: str) -> bool:
        from pyarrow.fs import FileType

        return self.fs.get_file_info(self.key(rel)).type == FileType.File

    def upload(self, local: Path, rel: str) -> None:
        with local.open("rb") as src, self.fs.open_output_stream(self.key(rel)) as dst:
            shutil.copyfileobj(src, dst, CHUNK)

    def upload_text(self, text: str, rel: str) -> None:
        with tempfile.TemporaryDirectory(prefix="ftlaunch-upload-") as tmp:
            path = Path(tmp) / "object"
            path.write_text(text)
            self.upload(path, rel)

    def download(self, rel: str, local: Path) -> None:
        """The object ``rel`` into ``local``, through a temporary file renamed into place."""
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.download")
        with self.fs.open_input_stream(self.key(rel)) as src, tmp.open("wb") as dst:
            shutil.copyfileobj(src, dst, CHUNK)
        os.replace(tmp, local)

    def read_text(self, rel: str) -> str | None:
        """The object's text, or None when there is none."""
        if not self.exists(rel):
            return None
        with self.fs.open_input_stream(self.key(rel)) as f:
            return f.read().decode("utf-8", errors="replace")

    def delete(self, rel: str) -> None:
        if self.exists(rel):
            self.fs.delete_file(self.key(rel))

    def delete_folder(self, rel: str) -> None:
        """An empty folder (the marker object some stores keep for it); one still holding
        objects is left alone."""
        from pyarrow.fs import FileType

        if self.fs.get_file_info(self.key(rel)).type == FileType.Directory and not self.listing(rel):
            self.fs.delete_dir(self.key(rel))
