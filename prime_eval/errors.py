"""User-facing errors: the message names the problem and the fix; the CLI prints it without a traceback."""


class UserError(Exception):
    """Bad input from the user (file, option, data). Message must say what is wrong and how to fix it."""
