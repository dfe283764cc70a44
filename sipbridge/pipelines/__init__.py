"""Packaged pipelines and layouts (TOML data files): ``synthetic.toml`` for ``sipbridge up``, ``bridge.toml``
the graph of a bridged call (sipbridge.graph reads it)."""
