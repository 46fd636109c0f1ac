"""User-facing errors: the CLI prints them as one line and exits non-zero, never a traceback."""


class QtuluError(Exception):
    """A problem the user can fix (bad input, missing file, impossible setting).

    The message names the file, line or key and says what to do. `exit_code` follows the
    CLI's convention: 1 for bad input data or files, 2 for bad configuration or usage,
    3 for a feature that is not built yet.
    """

    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigError(QtuluError):
    """One or more configuration errors; each entry of `errors` is one line."""

    exit_code = 2

    def __init__(self, errors: list[str]):
        super().__init__("\n".join(errors))
        self.errors = errors


class NotBuiltYet(QtuluError):
    """A command whose work belongs to an open issue: says so plainly instead of faking output."""

    exit_code = 3
