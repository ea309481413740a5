"""The one way every command-line script of both packages ends: a user error is one line.

``cli_main(main)`` runs a script's ``main``: a user error (argparse's included), a file the OS
refuses or a full disk is one ``error: ...`` line on stderr (rank 0 only) and exit status 2;
Ctrl-C and SIGTERM are one line and 130 / 143 after the script's own clean-up.
"""

from __future__ import annotations

import argparse
import errno
import signal
import sys
import threading

from adm_common.errors import UsageError
from adm_common.launcher import launcher_rank


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's preemption, ``kill``), raised where the process is, like Ctrl-C, so
    that the same clean-up runs."""


def _raise_terminated(signum, frame):
    raise Terminated()


def _one_line_usage_error(parser, message):
    """argparse's ``error`` without the usage block: one line, through cli_main."""
    raise UsageError(f"{message} (see {parser.prog} --help)")


def _os_error_line(exc: OSError) -> str:
    where = f" {exc.filename}" if exc.filename else ""
    if exc.errno == errno.ENOSPC:
        return (f"no space left on the device writing{where}; free some space and rerun the same "
                "command (finished work is kept)")
    if exc.errno == errno.EDQUOT:
        return f"disk quota exceeded writing{where}; free some space and rerun the same command"
    if exc.errno is not None and exc.strerror:
        return f"{exc.strerror}:{where}" if where else exc.strerror
    return str(exc)


def cli_main(main):
    """Run a script's ``main``. A user error (argparse's included), a file the OS refuses, or a full
    disk ends as one ``error: ...`` line on stderr (rank 0 only) and exit status 2; Ctrl-C and
    SIGTERM end as one line with status 130 / 143 after the script's own clean-up has run.
    Anything else is a bug and keeps its traceback."""
    def fail(message: str, status: int):
        if launcher_rank() == 0:
            print(f"error: {message}", file=sys.stderr)
        sys.exit(status)

    parser_error = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = _one_line_usage_error
    in_main_thread = threading.current_thread() is threading.main_thread()
    term_handler = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        main()
    except Terminated:
        fail("terminated (SIGTERM); rerun the same command to resume", 128 + signal.SIGTERM)
    except KeyboardInterrupt:
        fail("interrupted; rerun the same command to resume", 128 + signal.SIGINT)
    except (UsageError, ValueError) as exc:
        fail(str(exc), 2)
    except OSError as exc:
        fail(_os_error_line(exc), 2)
    finally:
        argparse.ArgumentParser.error = parser_error
        if in_main_thread:
            signal.signal(signal.SIGTERM, term_handler)
