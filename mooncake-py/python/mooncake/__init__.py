"""mooncake-rs: a drop-in ``mooncake.store`` backed by a Rust implementation of Mooncake.

``from mooncake.store import MooncakeDistributedStore`` is the entry point; ``mooncake_master``
(installed as a console script) runs the master service.
"""
