"""The errors napari-binn raises for things a user can fix: a bad bundle, configuration, input, output folder,
or a missing optional backend.

All are :class:`NapariBinnError`, a ``ValueError`` (code that catches ``ValueError`` keeps working). The command
line prints them as one line, ``napari-binn: <what> in <file>[: <key>]: <what to do>``, and exits with code 2;
anything else is a bug (a traceback, exit code 1). See docs/errors.md.
"""

from __future__ import annotations

import os

__all__ = ["NapariBinnError", "BundleError", "ConfigError", "InputError", "OutputError",
           "BackendUnavailableError"]


class NapariBinnError(ValueError):
    """A problem with what napari-binn was given, which the user can fix; the message says what and how.

    ``file`` and ``key`` (optional) say where: the file, and the key / section / entry in it.
    """

    def __init__(self, message: str, *, file: str | os.PathLike | None = None, key: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.file = None if file is None else str(file)
        self.key = key

    def __str__(self) -> str:
        """The message, prefixed with where (``in <file>: <key>: ``) when the message does not say it already."""
        where = []
        if self.file is not None and os.path.basename(self.file) not in self.message:
            where.append(f"in {self.file}")
        if self.key is not None and self.key not in self.message:
            where.append(str(self.key))
        return ": ".join([*where, self.message])


class BundleError(NapariBinnError):
    """A results bundle that cannot be read: a file missing, malformed, or from a newer schema."""


class ConfigError(NapariBinnError):
    """A configuration (TOML file or config object) with an unknown key, a wrong type or a value out of range."""


class InputError(NapariBinnError):
    """An image stack, ROI or array that cannot be used (empty, wrong shape, not finite, no calibration...)."""


class OutputError(NapariBinnError, FileExistsError):
    """An output folder that cannot be written: it exists, another run is writing it, or it is not writable.
    Also a ``FileExistsError``."""


class BackendUnavailableError(NapariBinnError, ImportError):
    """An optional backend that is not installed (e.g. PySR without Julia); the message says how to get it.
    Also an ``ImportError``."""
