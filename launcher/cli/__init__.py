"""The ``ftlaunch`` command: parse (``parsers``, ``cluster_parsers``), hand the arguments to the
layer that does the work (``commands``), and turn what comes back into the exit code.

Exit codes: 0 success, 1 training failure, 2 invalid recipe, data or arguments; 130 and 143
after SIGINT and SIGTERM (with the command that resumes the run).
"""

from __future__ import annotations

import gc
import signal
import sys

from launcher.errors import ExportError, UserInputError
from launcher.cli.commands import COMMANDS
from launcher.cli.parsers import SUBCOMMANDS, build_parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in SUBCOMMANDS and not argv[0].startswith("-"):
        argv.insert(0, "train")
    args = build_parser().parse_args(argv)
    args.argv = argv
    from launcher.driver.ray_session import settle
    from launcher.driver.stop import Terminated, signal_received, signals_raise

    try:
        with signals_raise():
            return COMMANDS[args.command](args)
    except UserInputError as e:
        print(f"ftlaunch: error: {e}", file=sys.stderr)
        return 2
    except ExportError as e:
        print(f"ftlaunch: export failed: {e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Terminated):
        return stopped(argv)
    except Exception:
        if signal_received() is None:
            raise
        return stopped(argv)  # a library's clean-up raised on the way out of the stop
    finally:
        settle()  # after the message: a launch that failed while Ray was starting shuts it down


def entry() -> int:
    """The ``ftlaunch`` executable: :func:`main`, then every object the command built is
    frozen out of the garbage collector. The interpreter's collections at exit would walk
    all of them (torch, transformers, DeepSpeed and Ray leave ~600k): 1.6-2 s after the work
    is done, on 2 cores. Frozen, they are freed with the process instead; atexit handlers and
    objects freed by reference count are unaffected. Not for in-process callers of main."""
    code = main()
    gc.freeze()
    return code


def stopped(argv: list[str]) -> int:
    """After SIGINT or SIGTERM outside training: the command that continues, and 130/143."""
    from launcher.driver.stop import EXIT_CODES, resume_command, signal_received

    sig = signal_received() or signal.SIGINT
    print(f"ftlaunch: stopped by {sig.name}. To resume, run:\n  {resume_command(argv)}",
          file=sys.stderr)
    return EXIT_CODES[sig]
