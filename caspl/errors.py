"""User-facing errors: one line that names the culprit and the fix. The CLI prints them without a traceback."""


class CasplError(Exception):
    """Base class of errors caused by the user's input rather than by a bug."""


class ConfigError(CasplError):
    """An invalid config value or key."""


class FieldError(ConfigError):
    """A config section's own check of one field; `caspl.config.from_dict` restates it under the field's dotted key."""

    def __init__(self, field: str, problem: str, owner: str = ""):
        self.field, self.problem = field, problem
        super().__init__(f"{owner + '.' if owner else ''}{field} {problem}")


class DataError(CasplError):
    """A dataset folder, split file or image that cannot be used."""


class CheckpointError(CasplError):
    """A weights or prompt file that does not fit what it is loaded into."""
