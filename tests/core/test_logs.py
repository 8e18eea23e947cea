"""Silencing is scoped: logger levels and the root logger's handlers are as before once the block ends."""

import logging

from edgeprune.core.logs import quiet_logs


def test_quiet_logs_restores_levels_and_installs_no_handler():
    root, named = logging.getLogger(), logging.getLogger("edgeprune-test.quiet")
    named.setLevel(logging.INFO)
    root_level, root_handlers = root.level, list(root.handlers)
    with quiet_logs("", "edgeprune-test.quiet"):
        assert named.level == logging.ERROR and root.level == logging.ERROR
        logging.warning("a library's bare module-level warning")  # would call basicConfig() without a handler
    assert named.level == logging.INFO and root.level == root_level
    assert root.handlers == root_handlers


def test_quiet_logs_works_as_a_decorator_and_restores_after_an_error():
    named = logging.getLogger("edgeprune-test.decorated")
    named.setLevel(logging.DEBUG)

    @quiet_logs("edgeprune-test.decorated")
    def fails():
        assert named.level == logging.ERROR
        raise ValueError("boom")

    try:
        fails()
    except ValueError:
        pass
    assert named.level == logging.DEBUG
