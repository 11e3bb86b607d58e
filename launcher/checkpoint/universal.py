"""DeepSpeed's universal checkpoint format (loadable at any world size): a verified step
directory converted once, committed with its own manifest like any save."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from launcher.checkpoint.commit import UNIVERSAL, commit, flush_and_hash, payload_files, tree_problem


def to_universal(ckpt: Path, warn: Callable[[str], None]) -> Path:
    """Convert a verified checkpoint to DeepSpeed's universal format (loadable at any world
    size), once. The result lives in ``<ckpt>/universal`` with its own manifest and appears
    there only when complete. An existing one is reused only if it matches that manifest;
    otherwise it is set aside (kept, never loaded) and the conversion redone."""
    target = ckpt / UNIVERSAL
    if target.exists() or target.is_symlink():
        wrong = tree_problem(target)
        if wrong is None:
            return target
        aside = ckpt.parent / f".{ckpt.name}.universal.rejected.{time.time_ns()}"
        target.rename(aside)
        warn(f"{target} is not a verified conversion ({wrong}); moved it to {aside} and "
             "converting again")
    staging = Path(tempfile.mkdtemp(dir=ckpt.parent, prefix=f".{ckpt.name}.universal."))
    out = staging / "out"
    try:
        subprocess.run(
            [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
             "--input_folder", str(ckpt), "--output_folder", str(out)],
            check=True, capture_output=True, text=True,
        )
        commit(out, flush_and_hash(out, payload_files(out)), {"converted_from": ckpt.name})
        out.rename(target)
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"universal conversion of {ckpt} failed:\n{e.stderr[-2000:]}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # mkdtemp made it: only ftlaunch's files
    return target
