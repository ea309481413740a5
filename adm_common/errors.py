"""The error type for mistakes a user can fix; scripts print it as one line (adm_common.cli.cli_main)."""


class UsageError(ValueError):
    """A wrong flag, file or value; the message says what was wrong and what to do instead."""
