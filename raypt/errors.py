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


def user_error(exc: BaseException, types: tuple = (UserError,)) -> UserError | None:
    """The user-input error (of `types`) behind an exception, also one that came back through Ray: task errors keep
    it in `.cause`, Ray Train's WorkerGroupError in `.worker_failures`."""
    import sys

    ray_error = getattr(sys.modules.get("ray.exceptions"), "RayError", ())  # (no Ray import where none was used)
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, types) and not isinstance(e, ray_error):
            return e
        todo.extend([getattr(e, "cause", None), e.__cause__, e.__context__])
        todo.extend(getattr(e, "worker_failures", {}).values())
    return None
