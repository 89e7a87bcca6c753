"""The fast tier starts no process: while a test that is not marked ``rig`` runs (its
setup, call and teardown; not the session's last teardown, which also stops the rig's
processes), every way this interpreter has to start a program or fork itself raises
instead. A unit test that starts redis-server, gunicorn, htpasswd or a
second Python fails loudly here, naming what it tried, rather than making
`tests/run.sh fast` slow and dependent on the machine."""

from __future__ import annotations

import _posixsubprocess
import contextlib
import os
import subprocess
from collections.abc import Iterator
from typing import Any


class ProcessInFastTier(AssertionError):
    """A test outside the rig tried to start a process."""


def _refuse(what: str) -> Any:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        shown = " ".join(map(str, args[1] if what == "subprocess" else args))[:200]
        raise ProcessInFastTier(
            f"the fast tier starts no process ({what}: {shown}); do without it, or mark the"
            " test rig (the full tier, beside the rig's processes in tests/e2e)"
        )

    return refuse


# (module, attribute, label): subprocess's one door to fork/exec or posix_spawn, and the
# os and _posixsubprocess calls that multiprocessing and os.system-style code use.
_DOORS: list[tuple[Any, str, str]] = [
    (subprocess.Popen, "_execute_child", "subprocess"),
    (_posixsubprocess, "fork_exec", "fork_exec"),
    *(
        (os, name, f"os.{name}")
        for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system", "execv", "execve")
        if hasattr(os, name)
    ),
]


@contextlib.contextmanager
def no_process() -> Iterator[None]:
    """Every door shut for the duration of the block, then restored as it was."""
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in _DOORS]
    try:
        for owner, name, label in _DOORS:
            setattr(owner, name, _refuse(label))
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)
