"""The one exception type the `dalle` command turns into a one-line message.

Raise `DalleError` for anything a user can fix (bad input, missing file, mismatched
checkpoint); the CLI prints its message and exits with status 2, with no traceback.
"""


class DalleError(Exception):
    """An error caused by user input, printed as one line by the CLI."""
