"""The OCI Distribution API served at /v2: routing a name to its upstream, the
pull-through proxy (read through, tee into the store), and the token service."""
