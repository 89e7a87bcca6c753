"""The /v2 proxy modules' shared fixtures (tests/e2e/v2_proxy.py): the store under test,
its view, the images and a server in front of the fault front. Each module that asks
for them gets its own instances (module scope), so the modules run side by side."""

from tests.e2e.v2_proxy import layers, serve, store_kind, view

__all__ = ["layers", "serve", "store_kind", "view"]
