"""The one exception type for mistakes a user can fix; the CLI prints it without a traceback."""


class QLoRAError(Exception):
    """A bad config value, a missing file or an impossible combination, with what to do about it."""
