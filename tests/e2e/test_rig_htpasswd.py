"""The rig's recorded `htpasswd` lines (tests/support/htpasswd.py) are what the binary
makes today: each argument list run again gives a line of the same shape (salt and hash
aside), and every recorded bcrypt line verifies its password."""

from __future__ import annotations

import bcrypt
import pytest

from tests.support.htpasswd import RECORDED, run_htpasswd, shape

pytestmark = pytest.mark.rig


@pytest.mark.parametrize("args", sorted(RECORDED), ids=" ".join)
def test_a_recorded_line_is_what_htpasswd_makes(args: tuple[str, ...]) -> None:
    recorded = RECORDED[args]
    assert shape(run_htpasswd(*args)) == shape(recorded)
    if args[0] == "-B":
        user, hashed = recorded.split(":", 1)
        assert user == args[-2]
        # bcrypt reads 72 bytes of a password, as htpasswd cuts it
        assert bcrypt.checkpw(args[-1].encode()[:72], hashed.encode())
