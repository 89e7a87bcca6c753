"""The /v2 proxy modules' shared fixtures (rig.py): the store under test (filesystem and
S3), its view, the images and a server in front of the fault front, for the modules of
this directory only. Each module gets its own instances (module scope), so the modules
run side by side."""

from tests.e2e.v2proxy.rig import layers, serve, store_kind, view

__all__ = ["layers", "serve", "store_kind", "view"]
