"""A run whose final/ was not written by this ftlaunch (an older version wrote no
ftlaunch_export.json, or a user added files): rerunning the finished run moves that final/
aside, never deletes it, and exports again; an explicit --out holding such files is refused."""

from __future__ import annotations

import json

import pytest

from launcher.run.export import EXPORT_MARK
from tests.conftest import tiny_recipe, write_recipe


@pytest.mark.e2e
def test_unmarked_final_is_moved_aside_on_rerun(cli, tmp_path, monkeypatch) -> None:
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(run, train={"max_steps": 2}))
    code, _, err = cli(recipe, "--backend", "torchrun")
    assert code == 0, err
    final = run / "final"
    (final / EXPORT_MARK).unlink()  # as an older ftlaunch left it
    (final / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in final.iterdir()}

    code, _, err = cli(recipe, "--backend", "torchrun")  # finished: no new steps, re-export
    assert code == 0, err  # main: exit 2, "holds files ftlaunch did not write"
    aside = [p for p in run.iterdir() if p.name.startswith("final.old-")]
    assert len(aside) == 1 and str(aside[0]) in err
    assert {p.name: p.read_bytes() for p in aside[0].iterdir()} == before  # kept intact
    assert json.loads((final / EXPORT_MARK).read_text())["step"] == 2
    assert not (final / "notes.txt").exists()

    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    code, _, err = cli("export", run, "--out", other)
    assert code == 2 and "did not write" in err
    assert [p.name for p in other.iterdir()] == ["notes.txt"]

    # Paths on the command line are literal, and '~' is expanded as a shell would (users quote
    # '~/models/x'); on main '~' made a directory named '~' in the current directory.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "home").mkdir()
    run.rename(tmp_path / "home" / "run")
    for given, lands in [("~/exp #3: ü x", tmp_path / "home" / "exp #3: ü x"),
                         ("-dash", tmp_path / "-dash")]:  # fmt: skip
        code, out, err = cli("export", "~/run", f"--out={given}")
        assert code == 0, err
        assert out.strip() == str(lands) and (lands / EXPORT_MARK).is_file()
    assert not (tmp_path / "~").exists()
