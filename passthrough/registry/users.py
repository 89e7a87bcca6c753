"""passthrough's own users: HTPASSWD_FILE (Apache htpasswd, bcrypt hashes only, as
``htpasswd -B`` writes them), reloaded when the file changes, and a short-lived cache of
verified logins so that Basic credentials on every /v2 request do not each cost a bcrypt.

Only bcrypt (``$2y$``, ``$2b$``, ``$2a$``) is accepted: Apache's other kinds (``$apr1$``
MD5, ``{SHA}``, crypt, plain text) are fast to brute-force, so a file holding one stops
start-up with a line naming HTPASSWD_FILE and the line number, never the hash.

Timing: an unknown user is checked against a dummy hash of the same cost, so a failed
login takes as long whether or not the user exists. Nothing here logs a password or a
hash; the verified-login cache keys on an HMAC of user and password under a key made
for this process, so not even a digest of a password outlives the process.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import bcrypt

from passthrough.config import ConfigError
from passthrough.registry.watched import WatchedFile

VARIABLE = "HTPASSWD_FILE"
# $2y$ (Apache), $2b$ (OpenBSD, Python's bcrypt) and $2a$ (older libraries) are one
# algorithm; cost 04–31, then 22 characters of salt and 31 of hash.
_BCRYPT_RE = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
# A user name as it travels in Basic credentials: no ':' (the separator), no control
# characters, no spaces (htpasswd allows them, Basic clients mangle them).
_USER_RE = re.compile(r"[^\s:\x00-\x1f\x7f]{1,255}")
_RESERVED = frozenset({"anonymous", "*"})
#: bcrypt reads at most 72 bytes of a password; htpasswd truncates, so do we.
BCRYPT_MAX_PASSWORD_BYTES = 72
#: How long a verified login is trusted without a bcrypt (seconds), and how many are kept.
VERIFIED_TTL = 180.0
VERIFIED_MAX = 4096


@dataclass(frozen=True)
class _Entry:
    hash: bytes
    cost: int


def parse_htpasswd(text: str, variable: str = VARIABLE) -> dict[str, _Entry]:
    """``user:hash`` lines (blank lines and ``#`` comments skipped) → the users, or a
    ConfigError naming ``variable`` and the line, never the hash."""
    users: dict[str, _Entry] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, colon, hashed = line.partition(":")
        if not colon or not user:
            raise ConfigError(f"{variable} line {number}: expected user:hash (htpasswd -B)")
        if not _USER_RE.fullmatch(user):
            raise ConfigError(
                f"{variable} line {number}: the user name holds spaces, control characters "
                "or is too long"
            )
        if user in _RESERVED or user.startswith("@"):
            # ACCESS_FILE gives these a meaning of their own.
            raise ConfigError(
                f"{variable} line {number}: {user!r} cannot be a user name "
                "('anonymous', '*' and '@…' mean something else in ACCESS_FILE)"
            )
        match = _BCRYPT_RE.fullmatch(hashed.strip())
        if match is None:
            # Name the kind when it is a known one, so the fix is obvious; never the hash.
            kind = _hash_kind(hashed.strip())
            raise ConfigError(
                f"{variable} line {number}: user {user!r} has a {kind} password; only bcrypt "
                "is accepted (make it with htpasswd -B)"
            )
        if user in users:
            raise ConfigError(f"{variable} line {number}: user {user!r} is given twice")
        users[user] = _Entry(match.group(0).encode("ascii"), int(match.group(1)))
    return users


def _hash_kind(hashed: str) -> str:
    if hashed.startswith("$apr1$"):
        return "MD5 ($apr1$)"
    if hashed.startswith("{SHA}"):
        return "SHA-1 ({SHA})"
    if hashed.startswith(("$5$", "$6$")):
        return "SHA-crypt"
    if hashed.startswith("$2"):
        return "malformed bcrypt"
    return "crypt or plain-text"


def _password_bytes(password: str) -> bytes:
    return password.encode("utf-8")[:BCRYPT_MAX_PASSWORD_BYTES]


class Users:
    """The users of an htpasswd file. :meth:`verify` is safe to call from many threads;
    the file is read again when its mtime, size or inode changes (an edit in place, or
    a new file moved over it, as htpasswd and Kubernetes' secret volumes do). A file
    that turns unreadable or invalid later is logged and the users known before are
    kept: start-up is where a bad file stops the service."""

    def __init__(
        self,
        path: str,
        *,
        variable: str = VARIABLE,
        clock: Callable[[], float] = time.monotonic,
        verified_ttl: float = VERIFIED_TTL,
    ) -> None:
        self.path = path
        self._variable = variable
        self._clock = clock
        self._verified_ttl = verified_ttl
        self._lock = threading.Lock()
        # A key of this process only: the cache's keys mean nothing outside it.
        self._cache_key = secrets.token_bytes(32)
        self._verified: OrderedDict[bytes, tuple[float, bytes]] = OrderedDict()
        self._dummy: dict[int, bytes] = {}
        # A changed file may have changed a password: logins verified before are not.
        # (Reloads happen in _users(), under self._lock, which guards the cache too.)
        self._file = WatchedFile(
            path,
            variable,
            lambda text: parse_htpasswd(text, variable),
            noun="users",
            count=len,
            on_change=lambda _: self._verified.clear(),
        )
        # Made now, not on the first unknown user: a bcrypt is slow by design.
        self._dummy_hash(self._typical_cost())

    def __repr__(self) -> str:
        with self._lock:
            return f"Users(path={self.path!r}, users={len(self._users())})"

    def _users(self) -> dict[str, _Entry]:
        return self._file.current()

    # -- queries ---------------------------------------------------------------------------

    def exists(self, user: str) -> bool:
        with self._lock:
            return user in self._users()

    def names(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._users())

    def verify(self, user: str, password: str) -> bool:
        """Whether ``password`` is ``user``'s. An unknown user costs a bcrypt as well."""
        with self._lock:
            entry = self._users().get(user)
            key = self._cache_digest(user, password)
            if entry is not None:
                cached = self._verified.get(key)
                if cached is not None and cached[0] > self._clock() and cached[1] == entry.hash:
                    return True
            dummy = None if entry is not None else self._dummy_hash(self._typical_cost())
        # bcrypt outside the lock: ~100 ms at cost 10, and other threads must not wait.
        candidate = _password_bytes(password)
        if entry is None:
            assert dummy is not None
            bcrypt.checkpw(candidate, dummy)
            return False
        if not bcrypt.checkpw(candidate, entry.hash):
            return False
        with self._lock:
            self._verified[key] = (self._clock() + self._verified_ttl, entry.hash)
            self._verified.move_to_end(key)
            while len(self._verified) > VERIFIED_MAX:
                self._verified.popitem(last=False)
        return True

    def _cache_digest(self, user: str, password: str) -> bytes:
        message = user.encode("utf-8") + b"\x00" + password.encode("utf-8")
        return hmac.new(self._cache_key, message, hashlib.sha256).digest()

    def _typical_cost(self) -> int:
        costs = [entry.cost for entry in self._users().values()]
        # The most common cost: an unknown user then takes as long as most known ones.
        return max(set(costs), key=costs.count) if costs else 10

    def _dummy_hash(self, cost: int) -> bytes:
        dummy = self._dummy.get(cost)
        if dummy is None:
            dummy = bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(cost))
            self._dummy[cost] = dummy
        return dummy
