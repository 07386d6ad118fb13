"""One error type for every user-facing failure.

The CLI prints ``CtrError`` as a single line (no traceback unless ``--debug``),
so the message must say which input, where, and what was expected.
"""


class CtrError(Exception):
    """A user-facing error: bad input, missing file, corrupt checkpoint, ..."""
