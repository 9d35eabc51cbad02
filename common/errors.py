"""The one exception type for mistakes a user can fix."""


class FedtuneError(Exception):
    """A problem the user caused and can fix; the message says how.

    The CLI prints it on one line, without a traceback, and exits non-zero.
    """
