"""A run directory that cannot be written, or a disk that fills during the run.

An output_dir that cannot be created (under a file, on a pseudo-filesystem or a read-only
mount) is exit 2 before anything starts, naming it. A disk that fills while a checkpoint is
saved fails the run with a sentence saying so (the worker's own error, torch's "iostream
error", says nothing of it), leaves no half-written temp file of ftlaunch's, and once space is
freed the same command resumes and finishes. The mounts need root with CAP_SYS_ADMIN; where
that is missing, those cases are skipped."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import tiny_recipe, write_recipe


@pytest.fixture
def tmpfs(tmp_path):
    mounts: list[Path] = []

    def mount(name: str, options: str) -> Path:
        point = tmp_path / name
        point.mkdir()
        try:
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
                                  capture_output=True, text=True)
        except FileNotFoundError:
            pytest.skip("no mount command here")
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounts.append(point)
        return point

    yield mount
    for point in reversed(mounts):
        subprocess.run(["umount", "-l", str(point)], check=False)


def _recipe(tmp_path: Path, run_dir: Path) -> Path:
    return write_recipe(tmp_path / "recipe.yaml", tiny_recipe(
        run_dir, checkpoint={"every_steps": 2}, eval={"at_start": False}))


@pytest.mark.parametrize("where", ["under a file", "in /proc", "read-only mount"])
def test_an_output_dir_that_cannot_be_written_is_exit_2_before_anything(where, tmp_path, cli,
                                                                         tmpfs):
    if where == "under a file":
        (tmp_path / "afile").write_text("")
        run_dir, expected = tmp_path / "afile" / "run", "is not a directory"
    elif where == "in /proc":
        run_dir, expected = Path("/proc/ftlaunch-run"), "No such file or directory"
    else:
        run_dir, expected = tmpfs("ro", "size=1m,ro") / "run", "Read-only file system"
    code, _, err = cli(_recipe(tmp_path, tmp_path / "unused"), "--output-dir", run_dir,
                       "--backend", "torchrun")
    assert code == 2, err
    assert err.startswith("ftlaunch: error: --output-dir: ") and expected in err, err
    assert not run_dir.exists()


def test_a_disk_that_fills_during_a_save_says_so_and_the_rerun_resumes(tmp_path, cli, tmpfs):
    disk = tmpfs("small", "size=2m")
    ballast = disk / "ballast"  # leaves about 250 KB: the run's files fit, a checkpoint not
    ballast.write_bytes(b"\0" * (2 * 1024 * 1024 - 250 * 1024))
    run_dir = disk / "run"
    recipe = _recipe(tmp_path, run_dir)
    code, _, err = cli(recipe, "--backend", "torchrun")
    assert code == 1, err
    assert f"the filesystem of {run_dir} is full" in err, err
    assert "Traceback" not in err, err
    assert not [p for p in run_dir.rglob(".*.tmp")]  # no half-written file of ours
    ballast.unlink()
    code, _, err = cli(recipe, "--backend", "torchrun")
    assert code == 0, err
    assert (run_dir / "final" / "config.json").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == [
        "step_00000002", "step_00000004"]


def _big_data(tmp_path: Path, rows: int = 4000) -> Path:
    """Enough rows for two tokenizing processes (one per 1,000 rows, up to the CPUs)."""
    import json
    import random

    from launcher.data.synthetic import make_example

    rng = random.Random(0)
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(make_example(rng)) + "\n" for _ in range(rows)))
    return path


def _row_tables_size(data: Path, work: Path) -> int:
    from launcher.data.read import numeric_fields
    from launcher.data.rowtable import row_tables
    from launcher.recipe.sections import DataSection

    cfg = DataSection(train=str(data), format="instruction", validation=None)
    row_tables(cfg.train, frozenset(numeric_fields(cfg)), work)
    return sum(p.stat().st_size for p in work.rglob("*") if p.is_file())


@pytest.mark.parametrize("disk", ["full while tokenizing", "read-only"])
def test_a_cache_dir_that_is_full_or_read_only_is_exit_2_naming_it(tmp_path, cli, tmpfs, disk):
    """The tokenized data cannot be written: exit 2 naming data.cache_dir's line, no
    traceback, nothing left in the cache. Full: the rows fit, the tokenizing processes'
    output does not, so the error is raised in a forked process and crosses to the driver."""
    from launcher.data.parallel import available_cpus

    data = _big_data(tmp_path)
    if disk == "read-only":
        cache = tmpfs("ro", "size=1m,ro") / "cache"
    else:
        mount = tmpfs("small", "size=2m")
        room = _row_tables_size(data, tmp_path / "measure") + 150 * 1024
        (mount / "ballast").write_bytes(b"\0" * (2 * 1024 * 1024 - room))
        cache = mount / "cache"
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_recipe(
        tmp_path / "run", data={"train": str(data), "validation": None,
                                "cache_dir": str(cache), "num_proc": 2}))
    code, _, err = cli("check", recipe)
    assert code == 2, err
    reason = "Read-only file system" if disk == "read-only" else "No space left on device"
    assert re.search(rf"recipe.yaml:\d+: data.cache_dir: cannot write the tokenized data under "
                     rf"{re.escape(str(cache))}: {reason}; nothing was cached", err), err
    assert "Traceback" not in err
    if disk != "read-only":
        assert available_cpus() < 2 or "(num_proc=2)" in err  # it failed in the processes
        assert list(cache.iterdir()) == []
