"""Sync: fill the content store before anyone asks, from SYNC_FILE
(:mod:`~passthrough.sync.spec`, :mod:`~passthrough.sync.semver`), through the
pull-through proxy's own verified, single-flight read path
(:mod:`~passthrough.sync.engine`); the runs' reports in the store
(:mod:`~passthrough.sync.runs`) and the API's background run
(:mod:`~passthrough.sync.background`). Between the web wing, which serves the API, and
the export wing below it."""
