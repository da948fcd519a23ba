//! The bodies of the fuzz targets, shared by `fuzz_targets/*.rs`. Each feeds
//! arbitrary bytes to one of dagrun's parsers of untrusted input; an `Err` is
//! the expected answer to garbage, a panic or a hang is a bug.

use dagrun::data::ingest::{IngestOptions, open_raw};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A workspace with a valid `config/tenants.yaml`, made once per process.
fn workspace() -> &'static Path {
    static WS: OnceLock<tempfile::TempDir> = OnceLock::new();
    WS.get_or_init(|| {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("config")).unwrap();
        std::fs::write(d.path().join("config/tenants.yaml"), "tenants:\n  - id: Tenant_A\n    share: 0.6\n  - id: Tenant_B\n    share: 0.4\n").unwrap();
        d
    })
    .path()
}

/// `dagrun::pipeline::parse_str` on the bytes (as UTF-8, lossily).
pub fn pipeline(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = dagrun::pipeline::parse_str(&text, "fuzz.yaml", workspace(), &[], &dagrun::stages::kinds());
}

/// `Tenants::parse` on the bytes.
pub fn tenants(data: &[u8]) {
    let _ = dagrun::pipeline::Tenants::parse(data, "config/tenants.yaml");
}

fn raw_file(ext: &str) -> PathBuf {
    workspace().join(format!("input-{}.{ext}", std::process::id()))
}

/// Write the bytes to a file and read it to the end with `open_raw`.
pub fn raw(data: &[u8], ext: &str) {
    let path = raw_file(ext);
    std::fs::write(&path, data).unwrap();
    let opts = IngestOptions {
        expected_tenant: Some("Tenant_A".into()),
        known_tenants: Some(vec!["Tenant_A".into(), "Tenant_B".into()]),
        require_label: false,
        allow_label: true,
        as_of: Some(20454),
    };
    if let Ok(reader) = open_raw(&path, &opts, 64) {
        for b in reader {
            if b.is_err() {
                break;
            }
        }
    }
}
