"""One exception type for bad input data.

Loaders raise :class:`DataError` (a ``ValueError``) so that callers can tell
"your files are wrong" apart from programming errors, and so every message
carries the file, line and column a user has to open to fix it.
"""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """Bad or missing input data; the message names the file, line and column."""

    def __init__(
        self,
        message: str,
        path: str | Path | None = None,
        line: int | None = None,
        column: str | None = None,
    ) -> None:
        self.path = None if path is None else str(path)
        self.line = line
        self.column = column
        where = []
        if path is not None:
            where.append(str(path))
        if line is not None:
            where.append(f"line {line}")
        if column is not None:
            where.append(f"column {column!r}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)
