"""Bad user input: its one exception type, and `one_line`, which the entry points print it through."""

from __future__ import annotations


class UserError(Exception):
    """Bad input (a name, a path, an override). The message says what is wrong and how to fix it.

    `details` is optional text for after that line (e.g. a listing of bad files, one per line): the
    message stays one complete line on its own, and the entry point prints the details below it.
    """

    def __init__(self, message: object = "", details: str | None = None):
        super().__init__(message)
        self.details = details

    def __reduce__(self):  # keep `details` across processes (DDP, launchers)
        return type(self), (*self.args[:1], self.details)


def one_line(text: object, limit: int | None = None) -> str:
    """`text` as one line (every run of whitespace, newlines included, becomes one space), cut at `limit`
    characters when given."""
    return " ".join(str(text).split())[:limit]
