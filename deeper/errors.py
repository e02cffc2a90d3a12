"""User-facing errors: one line, naming the file and row where there is one. Stages print them, no traceback."""

from __future__ import annotations


class DeeperError(Exception):
    """An error the user can act on; its message is one line."""


class InputError(DeeperError):
    """Bad input in a file: `path:row: message` (row is 1-based, counting the header line where there is one)."""

    def __init__(self, path, message: str, row: int | None = None):
        self.path, self.row, self.reason = str(path), row, message
        where = f"{self.path}:{row}" if row is not None else self.path
        super().__init__(f"{where}: {message}")


class ConfigError(DeeperError):
    """A params.yaml value that cannot work: `params.yaml: key: message`."""

    def __init__(self, key: str, message: str, path: str = "params.yaml"):
        super().__init__(f"{path}: {key}: {message}")


def first_line(error: BaseException) -> str:
    """An exception's message cut to its first line (its type's name if it has none): what a one-line error
    quotes of a library's multi-line message."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
