"""The one exception type that reaches the user as a single error line (see ``edgeprune.cli``)."""


class EdgePruneError(Exception):
    """A user-facing error: bad input, missing runtime, failed validation. Its message is the whole story."""
