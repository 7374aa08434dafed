//! P2P store for checkpoint distribution (work in progress: the piece scheduler, the piece
//! layout and the catalog so far).
#![deny(unsafe_code)]

pub mod catalog;
pub mod error;
pub mod piece;
pub mod scheduler;

pub use error::{Error, Result};
