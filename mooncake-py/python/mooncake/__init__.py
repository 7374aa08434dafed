"""mooncake-rs: a drop-in ``mooncake.store`` backed by a Rust implementation of Mooncake.

``from mooncake.store import MooncakeDistributedStore`` is the entry point; ``mooncake_master``
(installed as a console script) runs the master service. ``mooncake.engine.TransferEngine`` is
the transfer engine alone (upstream's binding, as vLLM and SGLang use it) and ``mooncake.p2p``
the P2P store.
"""
