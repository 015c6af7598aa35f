"""One exception type for every mistake a user can make, so the CLI can print it as one line."""


class DvtrainError(Exception):
    """A user-facing error: the message names the problem and the fix; no traceback is shown."""


class WriteFailed(DvtrainError):
    """A write that failed midway (a full disk, a folder turned read-only); what was saved before is kept. The
    message ends with "run it again": `dvtrain train` adds that --resume continues where it stopped."""
