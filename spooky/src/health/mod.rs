//! Backend health: the state machine ([`machine`], sans-IO) and the control thread that runs
//! it ([`checker`]).

pub mod checker;
mod machine;

pub use machine::*;
