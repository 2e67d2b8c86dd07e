"""The two failures a user can act on, mapped to the CLI's exit codes (DESIGN.md)."""


class MoefyError(Exception):
    """Base class: `message` is one paragraph naming the file/key and the fix."""

    exit_code = 2


class BadInput(MoefyError):
    """The user's input is wrong (path, recipe key, architecture, data): exit 2."""

    exit_code = 2


class CheckFailed(MoefyError):
    """A check ran and failed (validation mismatch, quality gate missed, NaN weights): exit 1."""

    exit_code = 1
