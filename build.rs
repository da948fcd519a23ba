//! Link settings of the `dagrun` binary.
//!
//! Relative relocations packed as RELR (`-z pack-relative-relocs`: ld ≥ 2.38,
//! glibc ≥ 2.36, as on Debian 12): the binary is a large PIE with ~49 000
//! relative relocations, which the dynamic loader otherwise applies one
//! 24-byte RELA entry at a time at every start (measured in README
//! "Performance", the 200-stage no-op rows). Only the binaries are linked so;
//! dependencies and test binaries are built as before.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let target = std::env::var("TARGET").unwrap_or_default();
    if target.ends_with("-linux-gnu") {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
