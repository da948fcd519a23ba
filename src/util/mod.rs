//! Small helpers shared by every module.
pub mod atomic;
pub mod child_env;
pub mod nofollow;
pub mod par;
pub mod prometheus;
