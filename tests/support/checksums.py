"""Stand-ins for archive checksum tests: a store's checksum records, and an archive."""

from __future__ import annotations

from typing import Any


class Records:
    """The store's side of checksums: what was recorded, by archive id."""

    def __init__(self) -> None:
        self.records: dict[str, dict[str, Any]] = {}
        self.writes = 0

    def recall_checksum(self, identity: str) -> dict[str, Any] | None:
        return self.records.get(identity)

    def remember_checksum(self, identity: str, record: dict[str, Any]) -> None:
        self.writes += 1
        self.records[identity] = record


class OneArchive:
    def __init__(self, identity: str) -> None:
        # Each test its own archive: KNOWN (the ids this process saw recorded) outlives it.
        self.checksum_identity = identity

    def start_fetching(self) -> None:
        return None

    def close(self) -> None:
        return None
