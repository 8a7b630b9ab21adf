"""Errors that reach the user as one clear line (exit code 2), never a traceback."""


class InputError(Exception):
    """Bad user input: the message says what is wrong, where, and how to fix it."""
