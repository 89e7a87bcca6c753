"""``passthrough gc`` killed with SIGKILL right after its Nth delete, for the tests that
prove a run killed half way leaves every tag pullable (tests/e2e/test_gc.py).

The real command (settings, store, lock, output) with an observer on gc's deletes
(:class:`passthrough.registry.gc.Collector`'s ``on_delete``), so production code holds
no test hook. Run as ``python -m tests.support.gc_killed N --delete --grace 0s``.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from passthrough import cli
from passthrough.registry import gc


def killing_collector(kill_after: int) -> type[gc.Collector]:
    """A Collector that SIGKILLs its process once ``kill_after`` deletes are done."""
    deletes = 0

    def counted(key: str) -> None:
        nonlocal deletes
        deletes += 1
        if deletes >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    class Killed(gc.Collector):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, on_delete=counted, **kwargs)

    return Killed


def main(argv: list[str]) -> int:
    kill_after = int(argv[0])
    if kill_after < 1:
        raise SystemExit("give the number of deletes after which gc is killed (1 or more)")
    # The command looks Collector up when it runs, so it builds this one.
    setattr(gc, "Collector", killing_collector(kill_after))  # noqa: B010
    return cli.main(["gc", *argv[1:]])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
