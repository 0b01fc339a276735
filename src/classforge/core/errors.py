"""The two exceptions every layer raises: one for the user's mistakes and limits, one for a bad data file."""


class ClassforgeError(Exception):
    """An error with a message meant for the user (printed without a traceback by the CLI)."""


class BadFile(Exception):
    """A data file that cannot be used; the message is the reason shown to the user."""
