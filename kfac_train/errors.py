"""The project's exception for mistakes a user can fix (bad config value, missing data, ...).

`train.py` prints a `UserError` as one line (`error: <message>`) and exits with status 2,
without a traceback. Raise it with a message that names the bad value and the fix, e.g.
``UserError(f"data.root={root!r} does not exist: set data.root=/path/to/imagenet")``.
Everything else (bugs, internal invariants) propagates with its traceback.
"""


class UserError(ValueError):
    """A user-facing configuration or input error, reported as one line."""
