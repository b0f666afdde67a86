"""The one exception type the CLI turns into a clear one-line error and a non-zero exit."""


class BlipDiffError(Exception):
    """A problem with the user's input (a file, a key, a value) that the message names."""


class ConfigError(BlipDiffError):
    """A bad key or value in params.yaml (or an override of it)."""
