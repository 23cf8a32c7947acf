"""The one exception type for errors a user can cause and fix."""


class UserError(Exception):
    """A problem in the user's inputs (params, data, environment) with a message saying how to fix it.

    Stage entry points turn it into one log line and a non-zero exit, without a traceback.
    """
