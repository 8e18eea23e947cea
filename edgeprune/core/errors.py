"""The one exception type that reaches the user as a single error line (see ``edgeprune.cli``)."""


class EdgePruneError(Exception):
    """A user-facing error: bad input, missing runtime, failed validation. Its message is the whole story."""


def check_minimums(args, **minimums) -> None:
    """Refuse numeric flags below their minimum before any work starts (``None``: the flag was not given)."""
    for name, minimum in minimums.items():
        value = getattr(args, name, None)
        if value is not None and value < minimum:
            raise EdgePruneError(f"--{name.replace('_', '-')} must be >= {minimum} (got {value})")
