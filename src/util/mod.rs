//! Small helpers shared by every module.
pub mod atomic;
pub mod par;
pub mod prometheus;
