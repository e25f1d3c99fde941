"""User-facing errors: one line, naming the file, line and field where there is one.

The CLI catches :class:`AlignkitError` and prints ``str(err)`` alone (no traceback), exit code 2.
Anything else that escapes is a bug in alignkit and keeps its traceback.
"""

from __future__ import annotations


class AlignkitError(Exception):
    """An error caused by the user's input or environment, reported as one line."""


class InputError(AlignkitError):
    """Bad input data or config: ``path:line: field 'x': message``."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        self.path, self.line, self.field, self.message = path, line, field, message
        where = ""
        if path is not None:
            where = str(path) + (f":{line}" if line is not None else "") + ": "
        what = f"field '{field}': " if field is not None else ""
        super().__init__(f"{where}{what}{message}".replace("\n", " "))


class EmptyFieldError(InputError):
    """A required text field is present but empty: an error, or a counted skip where the
    caller asks for that (real data sets carry a few such records)."""


class TrainingError(AlignkitError):
    """Training had to stop (NaN/inf, divergence): the message says where and what was kept."""
