"""User-facing errors: one line naming the problem and the fix, exit code 2, no traceback."""


class UserError(Exception):
    """A problem with the user's input (config, data, checkpoint, paths).

    ``main.py`` prints ``error: <message>`` on one line and exits with code 2.
    Messages should name the offending thing and say how to fix it.
    """

    exit_code = 2
