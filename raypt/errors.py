"""The root of every error in a user's input (config, corpus, model, checkpoint, a diverged run).

The driver and the Ray Train worker wrapper recognise these by type: a user error ends the run with its message and
exit status 2 (no retry, no traceback); anything else is a bug or an infrastructure failure that Ray may retry.
"""


class UserError(ValueError):
    """Bad input or a run that cannot go on; the message names the file or field and the fix."""

    @property
    def message(self) -> str:
        """The message alone (Ray appends retry advice to an exception that crossed a task boundary)."""
        return str(self.args[0]).split("\nFailed to apply UDF", 1)[0] if self.args else ""
