"""A build that failed, with its cause for the retry policy (`daemon/sched/retry.py`)."""

from daemon.sched.retry import Cause


class BuildError(Exception):
    """A build that failed; the message says why and shows the end of its log."""

    def __init__(
        self,
        message: str,
        cause: Cause = Cause.EXIT,
        exit_code: int | None = None,
        kept: str | None = None,
    ) -> None:
        super().__init__(message)
        self.cause = cause
        self.exit_code = exit_code
        self.kept = kept  # where the build dir was handed over (--keep-failed)
