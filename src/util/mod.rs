//! Small helpers shared by every module.
pub mod atomic;
pub mod par;
