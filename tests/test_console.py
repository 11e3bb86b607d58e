"""The run log's held lines (Ray's start-up messages before the run directory exists) reach the
terminal before a launch's last words, once."""

from __future__ import annotations

import logging
import sys

from launcher.driver import console


def test_held_lines_come_before_the_stop_report_and_only_once(capsys):
    with console.routed() as log:
        logging.getLogger("ray").warning("Started a local Ray instance.")
        log.print_held()
        print("ftlaunch: stopped by SIGTERM; no checkpoint yet.", file=sys.stderr)
    err = capsys.readouterr().err
    assert err.index("Started a local Ray instance.") < err.index("stopped by SIGTERM")
    assert err.count("Started a local Ray instance.") == 1


def test_held_lines_stay_held_until_the_run_log_opens(capsys, tmp_path):
    """logging.Handler.handle() calls the handler's release() (its lock) after every record:
    a method of that name on the run log printed all held lines at each new record."""
    import ray  # noqa: F401  (gives the "ray" logger its level and stderr handler)

    with console.routed():
        logging.getLogger("ray._private.worker").info("Started a local Ray instance.")
        logging.getLogger("ray").warning("Token authentication is enabled.")
        assert capsys.readouterr().err == ""
        console.attach(tmp_path)
        assert capsys.readouterr().err == ""
    text = (tmp_path / "driver.log").read_text()
    assert "Started a local Ray instance." in text and "Token authentication" in text
    assert capsys.readouterr().err == ""


def test_relay_names_a_worker_error_that_torchrun_prefixed_with_its_rank(capsys, tmp_path):
    """torchrun writes each worker's stderr as ``[rankN]: ...``: the failure message must still
    find the error (once, though every rank raised it), and the worker's own lines are said
    without the prefix."""
    log = tmp_path / "driver.log"
    log.write_text("")
    relay = console.Relay(log)
    error = "launcher.errors.UserInputError: run/checkpoints: none is committed and intact"
    log.write_text(
        "[rank0]: Traceback (most recent call last):\n"
        "[rank0]:   File \"worker.py\", line 1, in <module>\n"
        f"[rank0]: {error}\n[rank1]: {error}\n"
        "[rank1]: [ftlaunch] WARNING: skipping run/checkpoints/step_00000008\n"
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"
    )
    relay.poll()
    assert relay.errors == [error]
    assert "[ftlaunch] WARNING: skipping run/checkpoints/step_00000008" in capsys.readouterr().err


def test_routing_imports_nothing_and_the_bars_are_put_back_as_they_were():
    """``routed`` is entered before Ray starts, so it must not import transformers; the bars
    go off in ``no_progress_bars`` and come back only if they were on."""
    from transformers.utils import logging as hf_logging

    for was_on in (True, False):
        (hf_logging.enable_progress_bar if was_on else hf_logging.disable_progress_bar)()
        with console.routed():
            assert hf_logging.is_progress_bar_enabled() == was_on
            with console.no_progress_bars():
                assert not hf_logging.is_progress_bar_enabled()
        assert hf_logging.is_progress_bar_enabled() == was_on
    hf_logging.enable_progress_bar()
