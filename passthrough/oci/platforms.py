"""Platforms (os/arch/variant) and how an index entry is matched to the one wanted,
with containerd's variant defaults."""

from __future__ import annotations

import re
from dataclasses import dataclass

_PART_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,31}")


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        """``linux/arm64``, ``linux/arm64/v8``, ``linux/arm/v7``; raises ValueError."""
        parts = text.strip().lower().split("/")
        if len(parts) not in (2, 3) or not all(_PART_RE.fullmatch(p) for p in parts):
            raise ValueError("a platform is os/arch[/variant], as in linux/arm64 or linux/arm/v7")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)

    def normalized_variant(self) -> str | None:
        """containerd's defaults: arm64 without a variant is v8; arm without one is v7."""
        if self.variant:
            return self.variant
        if self.architecture == "arm64":
            return "v8"
        if self.architecture == "arm":
            return "v7"
        return None

    def matches(self, other: Platform) -> bool:
        return (
            self.os == other.os
            and self.architecture == other.architecture
            and self.normalized_variant() == other.normalized_variant()
        )


DEFAULT_PLATFORM = Platform("linux", "amd64")
