"""One exception type for every mistake a user can make, so the CLI can print it as one line."""


class DvtrainError(Exception):
    """A user-facing error: the message names the problem and the fix; no traceback is shown."""
