//! Helpers of the multi-process tests: the shared ones, and Raft master groups run as
//! `mooncake_master` processes.
#![allow(dead_code, unused_imports, unreachable_pub)]

pub mod masters;

pub use mooncake_testkit::*;
