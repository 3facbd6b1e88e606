"""The one exception type for bad input: the CLI prints it as a single line, without a traceback."""


class MlsaeError(ValueError):
    """Bad input from the user: a missing file, a setting out of range, a mismatched checkpoint."""
