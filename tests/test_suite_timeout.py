"""The suite's own safety net: a test that hangs fails after its timeout instead of blocking
the session (pytest-timeout, configured in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
import time

from tests.conftest import ROOT


def test_a_hanging_test_fails_the_session_instead_of_blocking_it(tmp_path):
    (tmp_path / "test_hang.py").write_text(
        "import subprocess, sys\n"
        "def test_hang():\n"
        "    subprocess.run([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
    )
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-c", str(ROOT / "pyproject.toml"),
         "--rootdir", str(tmp_path), "--timeout", "3", str(tmp_path / "test_hang.py")],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode != 0
    assert "Timeout" in done.stdout + done.stderr and "test_hang" in done.stdout + done.stderr
    assert time.monotonic() - started < 60
