"""HTPASSWD_FILE: entries made by Debian's own `htpasswd` binary (apache2-utils), bcrypt
only (every other kind `htpasswd` can make is refused with the line number and never
the hash), reloads when the file changes, the verified-login cache (one bcrypt per
login, not per request, forgotten when the file changes), a dummy bcrypt for unknown
users, and the 72-byte limit as htpasswd applies it."""

from __future__ import annotations

import os
from pathlib import Path

import bcrypt
import pytest

from passthrough.config import ConfigError
from passthrough.registry.users import Users, parse_htpasswd
from tests.support.htpasswd import bcrypt_line, htpasswd


def write(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def bump(path: Path, *lines: str) -> None:
    """Rewrite the file so that its mtime surely differs (some filesystems keep whole
    seconds), as an operator's edit would."""
    before = path.stat().st_mtime_ns
    write(path, *lines)
    os.utime(path, ns=(before + 2_000_000_000, before + 2_000_000_000))


class Counting:
    """bcrypt.checkpw, counted."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[bytes] = []
        real = bcrypt.checkpw

        def checkpw(password: bytes, hashed: bytes) -> bool:
            self.calls.append(hashed)
            return real(password, hashed)

        monkeypatch.setattr(bcrypt, "checkpw", checkpw)


def test_htpasswd_b_output_is_read(tmp_path):
    alice, bob = bcrypt_line("alice", "alice-pw"), bcrypt_line("bob", "bob-pw")
    assert alice.startswith("alice:$2y$04$")
    path = write(tmp_path / "users", "# passthrough's users", "", alice, "  " + bob + "  ")
    users = Users(str(path))
    assert users.names() == {"alice", "bob"}
    assert users.verify("alice", "alice-pw")
    assert users.verify("bob", "bob-pw")
    assert not users.verify("alice", "bob-pw")
    assert not users.verify("carol", "alice-pw")
    assert "$2y$" not in repr(users)


def test_default_cost_and_every_bcrypt_prefix(tmp_path):
    default = htpasswd("-B", "dave", "dave-pw")  # htpasswd's default cost (5)
    made_2b = bcrypt.hashpw(b"erin-pw", bcrypt.gensalt(4)).decode()
    made_2a = "$2a$" + made_2b[4:]
    path = write(tmp_path / "users", default, f"erin:{made_2b}", f"frank:{made_2a}")
    users = Users(str(path))
    assert users.verify("dave", "dave-pw")
    assert users.verify("erin", "erin-pw")
    assert users.verify("frank", "erin-pw")


@pytest.mark.parametrize(
    ("flag", "kind"),
    [("-m", "MD5"), ("-s", "SHA-1"), ("-d", "crypt or plain"), ("-p", "crypt or plain")],
)
def test_other_hash_kinds_are_refused_with_the_line_never_the_hash(tmp_path, flag, kind):
    weak = htpasswd(flag, "mallory", "weak-pw")
    hashed = weak.split(":", 1)[1]
    path = write(tmp_path / "users", bcrypt_line("alice", "a"), "# a comment", weak)
    with pytest.raises(ConfigError) as caught:
        Users(str(path))
    message = str(caught.value)
    assert message.startswith("HTPASSWD_FILE line 3: user 'mallory' has a ")
    assert kind in message and "htpasswd -B" in message
    assert hashed not in message and "weak-pw" not in message


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("no-colon-here", "line 1: expected user:hash"),
        (":$2y$04$" + "a" * 53, "line 1: expected user:hash"),
        ("alice:$2y$03$" + "a" * 53, "malformed bcrypt"),
        ("alice:$2y$04$" + "a" * 52, "malformed bcrypt"),
        ("anonymous:$2y$04$" + "a" * 53, "cannot be a user name"),
        ("@team:$2y$04$" + "a" * 53, "cannot be a user name"),
        ("*:$2y$04$" + "a" * 53, "cannot be a user name"),
    ],
)
def test_malformed_lines(line, expected):
    with pytest.raises(ConfigError, match=r"^HTPASSWD_FILE ") as caught:
        parse_htpasswd(line + "\n")
    assert expected in str(caught.value)
    assert "a" * 52 not in str(caught.value)


def test_a_user_twice_is_refused(tmp_path):
    path = write(tmp_path / "u", bcrypt_line("alice", "1"), bcrypt_line("alice", "2"))
    with pytest.raises(ConfigError, match="line 2: user 'alice' is given twice"):
        Users(str(path))


def test_an_unreadable_file_at_start_names_the_variable(tmp_path):
    with pytest.raises(ConfigError, match=r"^HTPASSWD_FILE: "):
        Users(str(tmp_path / "missing"))
    binary = tmp_path / "binary"
    binary.write_bytes(b"alice:\xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        Users(str(binary))


def test_the_file_is_reloaded_when_it_changes(tmp_path):
    path = write(tmp_path / "users", bcrypt_line("alice", "old-pw"))
    users = Users(str(path))
    assert users.verify("alice", "old-pw")
    bump(path, bcrypt_line("alice", "new-pw"), bcrypt_line("bob", "bob-pw"))
    # The verified login of the old password is forgotten with the old file.
    assert not users.verify("alice", "old-pw")
    assert users.verify("alice", "new-pw")
    assert users.exists("bob")


def test_a_file_moved_over_is_reloaded(tmp_path):
    path = write(tmp_path / "users", bcrypt_line("alice", "pw"))
    users = Users(str(path))
    replacement = write(tmp_path / "users.new", bcrypt_line("bob", "pw"))
    os.replace(replacement, path)
    assert users.names() == {"bob"}


def test_a_broken_edit_keeps_the_users_read_before(tmp_path, caplog):
    path = write(tmp_path / "users", bcrypt_line("alice", "pw"))
    users = Users(str(path))
    weak = htpasswd("-m", "alice", "pw")
    bump(path, weak)
    assert users.verify("alice", "pw")
    warnings = [r.getMessage() for r in caplog.records if "not reloaded" in r.getMessage()]
    assert len(warnings) == 1
    assert "line 1" in warnings[0] and weak.split(":", 1)[1] not in warnings[0]
    # Not read again on every request while it stays broken.
    assert users.verify("alice", "pw")
    assert len([r for r in caplog.records if "not reloaded" in r.getMessage()]) == 1
    path.unlink()
    assert users.exists("alice")


def test_a_verified_login_costs_one_bcrypt_then_none(tmp_path, monkeypatch):
    path = write(tmp_path / "users", bcrypt_line("alice", "pw"))
    users = Users(str(path))
    counting = Counting(monkeypatch)
    for _ in range(5):
        assert users.verify("alice", "pw")
    assert len(counting.calls) == 1
    # A wrong password is never cached: each attempt costs a bcrypt.
    for _ in range(3):
        assert not users.verify("alice", "wrong")
    assert len(counting.calls) == 4


def test_the_cache_expires(tmp_path, monkeypatch):
    now = [1000.0]
    path = write(tmp_path / "users", bcrypt_line("alice", "pw"))
    users = Users(str(path), clock=lambda: now[0], verified_ttl=60)
    counting = Counting(monkeypatch)
    assert users.verify("alice", "pw")
    now[0] += 59
    assert users.verify("alice", "pw")
    assert len(counting.calls) == 1
    now[0] += 2
    assert users.verify("alice", "pw")
    assert len(counting.calls) == 2


def test_the_cache_keeps_no_password(tmp_path):
    path = write(tmp_path / "users", bcrypt_line("alice", "pw-kept-nowhere"))
    users = Users(str(path))
    assert users.verify("alice", "pw-kept-nowhere")
    kept = repr(vars(users)).encode()
    assert b"pw-kept-nowhere" not in kept
    # Another process's cache keys (another HMAC key) are not this one's.
    other = Users(str(path))
    assert other._cache_digest("alice", "x") != users._cache_digest("alice", "x")


def test_an_unknown_user_costs_a_bcrypt_of_the_files_cost(tmp_path, monkeypatch):
    path = write(tmp_path / "users", bcrypt_line("alice", "pw"), bcrypt_line("bob", "pw"))
    users = Users(str(path))
    counting = Counting(monkeypatch)
    assert not users.verify("nobody", "pw")
    assert not users.verify("nobody", "pw")
    assert len(counting.calls) == 2
    # The dummy has the users' cost, so it takes as long as a real check.
    assert all(hashed.startswith(b"$2b$04$") for hashed in counting.calls)


def test_passwords_past_72_bytes_as_htpasswd_cuts_them(tmp_path):
    long = "p" * 72
    path = write(tmp_path / "users", bcrypt_line("alice", long + "-ignored-by-bcrypt"))
    users = Users(str(path))
    assert users.verify("alice", long + "-ignored-by-bcrypt")
    assert users.verify("alice", long)
    assert not users.verify("alice", long[:-1])


def test_verify_survives_odd_passwords(tmp_path):
    path = write(tmp_path / "users", bcrypt_line("alice", "ünïcödé pw"))
    users = Users(str(path))
    assert users.verify("alice", "ünïcödé pw")
    assert not users.verify("alice", "a\x00b")
    assert not users.verify("alice", "")
