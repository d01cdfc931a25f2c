"""The one exception type the `dalle` command turns into a one-line message, and the one place
that decides which other failures are the user's to fix.

Raise `DalleError` for anything a user can fix (bad input, missing file, mismatched
checkpoint); the CLI prints its message and exits with status 2, with no traceback.
"""

from __future__ import annotations

import errno
import json

import yaml
from PIL import Image, UnidentifiedImageError


class DalleError(Exception):
    """An error caused by user input, printed as one line by the CLI."""


def user_message(error: BaseException) -> str | None:
    """The one-line message of a failure the user can fix, or None for a bug (which keeps its traceback).

    Expected: `DalleError`; OS errors on the paths the user gave (missing, unreadable,
    unwritable, a file where a folder should be, a full disk); pictures PIL cannot read
    or refuses as decompression bombs; running out of memory (sizes too large for the machine);
    text that is not UTF-8; YAML/JSON that does not parse."""
    if isinstance(error, DalleError):
        return first_line(error)
    if isinstance(error, Image.DecompressionBombError):
        return f"a picture is too large to decode safely ({first_line(error)})"
    if isinstance(error, UnidentifiedImageError):
        return f"not a readable picture: {first_line(error)}"
    if isinstance(error, OSError):
        where = f"{error.filename}: " if error.filename else ""
        reason = error.strerror or first_line(error) or type(error).__name__
        if error.errno == errno.ENOSPC:
            reason = "no space left on the device"
        return f"{where}{reason}"
    if isinstance(error, MemoryError) or (isinstance(error, RuntimeError) and _out_of_memory(error)):
        return f"out of memory (are the sizes or counts asked for too large?): {first_line(error)}"
    if isinstance(error, UnicodeError):
        return f"text that is not UTF-8: {first_line(error)}"
    if isinstance(error, (yaml.YAMLError, json.JSONDecodeError)):
        return f"not valid YAML or JSON: {first_line(error)}"
    return None


def _out_of_memory(error: RuntimeError) -> bool:
    """torch's own allocation failures: CUDA's OutOfMemoryError, the CPU allocator's RuntimeError."""
    text = str(error)
    return type(error).__name__ == "OutOfMemoryError" or "can't allocate memory" in text or "out of memory" in text


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
