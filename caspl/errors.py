"""User-facing errors: one line that names the culprit and the fix. The CLI prints them without a traceback."""


class CasplError(Exception):
    """Base class of errors caused by the user's input rather than by a bug."""


class ConfigError(CasplError):
    """An invalid config value or key."""


class DataError(CasplError):
    """A dataset folder, split file or image that cannot be used."""


class CheckpointError(CasplError):
    """A weights or prompt file that does not fit what it is loaded into."""
