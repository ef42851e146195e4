"""Start a CLI under test the way a terminal would, for the tests that press Ctrl-C."""

import signal


def sigint_at_default() -> None:
    """A Popen `preexec_fn`: SIGINT at its default in the child, as from a terminal. A test run
    started in the background of a non-interactive shell (`cmd &`, nohup) inherits SIGINT
    ignored, Python then keeps it ignored, and a Ctrl-C sent to the child would never arrive."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
