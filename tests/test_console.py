"""The run log's held lines (Ray's start-up messages before the run directory exists) reach the
terminal before a launch's last words, once."""

from __future__ import annotations

import logging
import sys

from launcher.driver import console


def test_held_lines_come_before_the_stop_report_and_only_once(capsys):
    with console.routed() as log:
        logging.getLogger("ray").warning("Started a local Ray instance.")
        log.release()
        print("ftlaunch: stopped by SIGTERM; no checkpoint yet.", file=sys.stderr)
    err = capsys.readouterr().err
    assert err.index("Started a local Ray instance.") < err.index("stopped by SIGTERM")
    assert err.count("Started a local Ray instance.") == 1
