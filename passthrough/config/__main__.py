"""``python -m passthrough.config --markdown``: the README's settings table."""

from __future__ import annotations

import sys

from passthrough.config.docs import markdown_table

if __name__ == "__main__":
    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m passthrough.config --markdown")
    sys.stdout.write(markdown_table())
