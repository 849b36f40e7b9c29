"""Errors the CLI reports as one line on stderr with exit code 2."""


class UsageError(Exception):
    """Bad input from the user (unknown name, bad value, unreadable file...)."""
