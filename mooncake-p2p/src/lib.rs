//! P2P store for checkpoint distribution (work in progress: the piece scheduler and the piece
//! layout so far).
#![deny(unsafe_code)]

pub mod piece;
pub mod scheduler;
