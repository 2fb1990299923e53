"""The one exception type for mistakes a user can fix; the CLI prints it without a traceback."""


class QLoRAError(Exception):
    """A bad config value, a missing file or an impossible combination, with what to do about it."""

    exit_code = 2


class TrainingInterrupted(QLoRAError):
    """Stopped by SIGTERM/SIGINT after saving a checkpoint; exits with 128 + the signal number, as shells do."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum
