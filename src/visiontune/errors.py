"""The one exception type for bad user input: the entry points print its message as one line."""


class UserError(Exception):
    """Bad input (a name, a path, an override). The message says what is wrong and how to fix it."""
