"""The one error type for bad user input."""


class ConfigError(ValueError):
    """A configuration value, size or input file is invalid. The message names the key and what is allowed."""
