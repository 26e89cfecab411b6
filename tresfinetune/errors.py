"""The one exception type for problems the user can fix (bad paths, files, recipes, values).

Library code raises `UserError` with a single clear sentence; the CLI prints it without a traceback and exits 1.
Anything else that escapes is a bug in tresfinetune.
"""


class UserError(Exception):
    """A problem with the user's input, described in one sentence that says what to do."""
