"""The package's shape: no module imports itself back through others (the layering
between wings is import-linter's contract in pyproject.toml, run by tests/run.sh)."""

from __future__ import annotations

import grimp


def test_no_import_cycle_in_the_package() -> None:
    graph = grimp.build_graph("passthrough")
    modules = sorted(graph.modules)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if not imported.startswith("passthrough"):
                continue
            if state.get(imported) == 1:
                cycles.append([*path[path.index(imported) :], imported])
            elif imported not in state:
                visit(imported, [*path, imported])
        state[module] = 2

    for module in modules:
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_store_knows_nothing_of_registries() -> None:
    graph = grimp.build_graph("passthrough")
    assert not graph.find_shortest_chains(
        importer="passthrough.store", imported="passthrough.upstream"
    )
