"""Errors that carry a fix: the CLI prints them as one paragraph and exits non-zero."""


class DistillError(Exception):
    """A problem the user can fix; the message says where and how."""


class ConfigError(DistillError):
    """A config file or override that does not validate."""


class InputFileError(DistillError):
    """A seed, instruction or evaluation file that cannot be read as documented."""


class ModelNotFoundError(DistillError):
    """A model file or package that is missing or unreadable."""


class BudgetExceeded(DistillError):
    """The teacher budget (tokens or dollars) ran out; work done so far is kept."""
