"""Errors every layer raises; the CLI turns them into one line and an exit code."""


class SlimpipeError(Exception):
    """Base class: a message meant for the user, one line, no traceback."""

    exit_code = 2


class SpecError(SlimpipeError):
    """A user-supplied value is out of range or inconsistent (exit 2)."""

    exit_code = 2


class OutputError(SlimpipeError):
    """An output file could not be written once made (a full disk, a quota, an I/O error): not a bad
    value, so exit 120, Python's own code for output it could not flush."""

    exit_code = 120


class PlanFormatError(SlimpipeError):
    """A plan file is unreadable, malformed or of an unknown schema (exit 2). `rank` and `index`
    locate the instruction that could not be read, where there is one."""

    exit_code = 2

    def __init__(self, message: str, rank: int | None = None, index: int | None = None):
        super().__init__(message)
        self.rank, self.index = rank, index


class PlanInvalidError(SlimpipeError):
    """A well-formed plan breaks a schedule rule or deadlocks (exit 1)."""

    exit_code = 1
