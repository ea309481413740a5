"""The error type for mistakes a user can fix, and the one line an error becomes; scripts print
it through adm_common.cli.cli_main."""


class UsageError(ValueError):
    """A wrong flag, file or value; the message says what was wrong and what to do instead."""


def first_line(exc: BaseException, empty: str | None = None, limit: int | None = None) -> str:
    """The first line of an exception's message (at most ``limit`` characters); ``empty`` (else the
    exception's type name) when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else (empty or type(exc).__name__)


def one_line(exc: BaseException) -> str:
    """A user error as the one line a script prints: an OSError as its reason and file."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return first_line(exc)
