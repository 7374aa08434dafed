//! The verbs on real devices, through `sideway` (rdma-core).
