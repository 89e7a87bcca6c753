"""The README's settings table, generated from :mod:`passthrough.config.table` so it
cannot drift: ``python -m passthrough.config --markdown`` prints it, and a test compares
it with the README's."""

from __future__ import annotations

from passthrough.config.table import VARIABLES, Variable

HEADER = "| variable | default | meaning |\n| --- | --- | --- |"


def markdown_table() -> str:
    """One row per variable, in the table's order (by group)."""
    return "\n".join([HEADER, *(_row(v) for v in VARIABLES)]) + "\n"


def _row(variable: Variable) -> str:
    default = variable.default_text()
    shown = variable.shown if variable.shown is not None else f"`{default}`" if default else ""
    doc = variable.doc
    if variable.opentelemetry:
        doc += "; a standard OpenTelemetry variable"
    if variable.secret:
        doc += "; a secret"
    return f"| `{variable.name}` | {shown} | {doc} |"
