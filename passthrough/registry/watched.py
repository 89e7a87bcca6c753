"""A configuration file read again when it changes: HTPASSWD_FILE and ACCESS_FILE.

Read at start-up, where a bad file stops the service (a :class:`ConfigError` naming
its variable); then again whenever its mtime, size or inode changes (an edit in place,
or a new file moved over it, as ``htpasswd`` and Kubernetes' Secret and ConfigMap
volumes do), without a restart. A version that turns unreadable or invalid later is
logged once and the content read before is kept: a typo must not lock every user out.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from passthrough.config import ConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")
Stamp = tuple[int, int, int]


class WatchedFile(Generic[T]):
    """The parsed content of ``path`` (:meth:`current`), kept in step with the file.

    ``parse`` turns the text into the content or raises :class:`ConfigError`; ``noun``
    and ``count`` say what was read in the log line of a reload ("3 users");
    ``on_change`` is told of every reload after the first read. Thread-safe."""

    def __init__(
        self,
        path: str,
        variable: str,
        parse: Callable[[str], T],
        *,
        noun: str,
        count: Callable[[T], int],
        max_bytes: int | None = None,
        on_change: Callable[[T], None] | None = None,
    ) -> None:
        self.path = path
        self.variable = variable
        self._parse = parse
        self._noun = noun
        self._count = count
        self._max_bytes = max_bytes
        self._on_change = on_change
        self._lock = threading.Lock()
        self._stamp: Stamp | None = None
        self._content = self._read_initial()

    def _file_stamp(self) -> Stamp:
        status = os.stat(self.path)
        return (status.st_mtime_ns, status.st_size, status.st_ino)

    def _read(self) -> tuple[Stamp, T]:
        """(stamp, content), or ConfigError naming the variable and what is wrong."""
        try:
            stamp = self._file_stamp()
            if self._max_bytes is not None and stamp[1] > self._max_bytes:
                raise ConfigError(f"{self.variable}: larger than {self._max_bytes} bytes")
            with open(self.path, encoding="utf-8") as handle:
                text = handle.read()
        except OSError as exc:
            raise ConfigError(f"{self.variable}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{self.variable}: the file is not UTF-8") from None
        return stamp, self._parse(text)

    def _read_initial(self) -> T:
        self._stamp, content = self._read()
        return content

    def current(self) -> T:
        """The content, read again first when the file changed since the last read."""
        with self._lock:
            try:
                stamp: Stamp | None = self._file_stamp()
            except OSError:
                stamp = None
            if stamp != self._stamp:
                self._reload()
            return self._content

    def _reload(self) -> None:
        try:
            stamp, content = self._read()
        except ConfigError as exc:
            reason = str(exc).removeprefix(f"{self.variable}: ")
            log.warning(
                "%s not reloaded, keeping the %s read before: %s", self.variable, self._noun, reason
            )
            # Not tried again on every request until the file changes once more.
            try:
                self._stamp = self._file_stamp()
            except OSError:
                pass
            return
        log.info("%s reloaded: %d %s", self.variable, self._count(content), self._noun)
        self._content, self._stamp = content, stamp
        if self._on_change is not None:
            self._on_change(content)
