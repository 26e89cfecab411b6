"""The one exception type for problems the user can fix (bad paths, files, recipes, values).

Library code raises `UserError` with a single clear sentence; the CLI prints it without a traceback and exits 1.
Anything else that escapes is a bug in tresfinetune.
"""


class UserError(Exception):
    """A problem with the user's input, described in one sentence that says what to do.

    `shared=True` marks an error that every process of a torchrun job raises alike (e.g. a NaN loss, which all ranks
    see together), so that only rank 0 prints it.
    """

    def __init__(self, message: str, shared: bool = False):
        super().__init__(message)
        self.shared = shared
