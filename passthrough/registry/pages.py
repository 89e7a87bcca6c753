"""The spec's pagination of tag lists and the catalog (``n``, ``last`` and the ``Link``
to the next page), one implementation for the hosted area and the proxy."""

from __future__ import annotations

from urllib.parse import urlencode

from passthrough.errors import BadRequest


def page(items: list[str], n: str | None, last: str | None) -> tuple[list[str], bool]:
    """The spec's pagination: items after ``last`` (lexically), at most ``n``; and
    whether more follow."""
    if last:
        items = [item for item in items if item > last]
    if n is None or n == "":
        return items, False
    if not n.isdigit():
        raise BadRequest("n must be a whole number")
    count = int(n)
    return items[:count], len(items) > count


def paged(
    items: list[str], n: str | None, last: str | None, path: str
) -> tuple[list[str], dict[str, str]]:
    """A page of ``items`` and the headers that go with it: the ``Link`` to the next
    page at ``path``, when one follows."""
    chosen, more = page(items, n, last)
    headers: dict[str, str] = {}
    if more and chosen:
        headers["Link"] = next_page_link(path, n or "", chosen[-1])
    return chosen, headers


def next_page_link(path: str, n: str, last: str) -> str:
    """``Link: <path?n=…&last=…>; rel="next"``."""
    return f'<{path}?{urlencode({"n": n, "last": last})}>; rel="next"'
