//! `dagrun sample`: write synthetic raw data for one tenant (the generator of
//! spec §2) as CSV or Parquet, e.g. to try the ingest pipeline. The rows hold
//! synthetic, not real, PII.

use crate::data::generate::generate_tenant;
use crate::data::parquet_io::open_batches;
use crate::util::atomic::AtomicFile;
use anyhow::{Context, Result};
use arrow_array::{Array, BooleanArray, Date32Array, Float64Array, Int64Array, RecordBatch, StringArray};
use std::io::Write;
use std::path::Path;

fn csv_field(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains([',', '"', '\n', '\r']) { format!("\"{}\"", s.replace('"', "\"\"")).into() } else { s.into() }
}

/// Write a raw-schema batch as CSV rows.
pub fn write_csv_rows(out: &mut dyn Write, batch: &RecordBatch) -> Result<()> {
    let s = |n: &str| batch.column_by_name(n).and_then(|c| c.as_any().downcast_ref::<StringArray>().cloned()).context(n.to_string());
    let i = |n: &str| batch.column_by_name(n).and_then(|c| c.as_any().downcast_ref::<Int64Array>().cloned()).context(n.to_string());
    let (t, pii) = (s("Tenant_ID")?, s("Sensitive_Data")?);
    let (id, lc) = (i("Customer_ID")?, i("Login_Count")?);
    let pa = batch.column_by_name("Purchase_Amount").and_then(|c| c.as_any().downcast_ref::<Float64Array>().cloned()).context("Purchase_Amount")?;
    let d = batch.column_by_name("Last_Visit_Date").and_then(|c| c.as_any().downcast_ref::<Date32Array>().cloned()).context("Last_Visit_Date")?;
    let y = batch.column_by_name("Converted").and_then(|c| c.as_any().downcast_ref::<BooleanArray>().cloned());
    for r in 0..batch.num_rows() {
        write!(
            out,
            "{},{},{},{},{},{}",
            csv_field(t.value(r)),
            id.value(r),
            csv_field(pii.value(r)),
            lc.value(r),
            pa.value(r),
            crate::data::schema::format_date(d.value(r))
        )?;
        match &y {
            Some(y) if y.is_valid(r) => writeln!(out, ",{}", y.value(r))?,
            Some(_) => writeln!(out, ",")?,
            None => writeln!(out)?,
        }
    }
    Ok(())
}

/// Write `rows` synthetic rows of `tenant` to `out` (.csv or .parquet).
pub fn sample(out: &Path, tenant: &str, rows: u64, seed: u64, as_of: i32, with_label: bool) -> Result<()> {
    crate::pipeline::tenants::validate_tenant_id(tenant).map_err(crate::error::config)?;
    if rows == 0 {
        return Err(crate::error::config("--rows 0: give at least 1 row (a file of only a header is refused by `predict` and `ingest`)"));
    }
    crate::data::generate::check_as_of(as_of).map_err(|m| crate::error::config(format!("--as-of: {m}")))?;
    if rows > crate::data::generate::MAX_TENANT_ROWS {
        return Err(crate::error::config(format!("--rows {rows}: at most {} rows can be generated for one tenant", crate::data::generate::MAX_TENANT_ROWS)));
    }
    let ext = out.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
    if !matches!(ext.as_str(), "parquet" | "pq" | "csv") {
        return Err(crate::error::config(format!("{}: use a .csv or .parquet file name", out.display())));
    }
    let dir = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    // Never into `.dagrun/`, `config/` or `.git/` (a typo must not replace the keyring).
    let ws = crate::workspace::Workspace::locate(dir).unwrap_or_else(|| crate::workspace::Workspace::at(dir));
    ws.check_user_output(out, "--out")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create the folder {} for --out", dir.display()))?;
    // What a `sample` stopped by SIGKILL left here (plaintext rows): its
    // staging file and its output's temporary file, untouched for 10 minutes.
    let stale = std::time::Duration::from_secs(600);
    crate::util::atomic::sweep_stale_temp_files(dir, "sample", stale);
    if let Some(name) = out.file_name().and_then(|n| n.to_str()) {
        crate::util::atomic::sweep_stale_temp_files(dir, name, stale);
    }
    // Ctrl-C, SIGTERM or SIGHUP: stop at the next batch, with the temporary
    // files (plaintext) removed (util::interrupt).
    crate::util::interrupt::catch();
    let tmp = tempfile_in(dir)?;
    let result = (|| -> Result<()> {
        // (An error names the temporary file: say which file it was for.)
        generate_tenant(&tmp, tenant, rows, seed, as_of).with_context(|| format!("cannot write {}", out.display()))?;
        let batches = open_batches(&tmp, crate::data::DEFAULT_BATCH_SIZE)?;
        let strip = |mut b: RecordBatch| -> Result<RecordBatch> {
            if !with_label {
                let idx = b.schema().index_of("Converted")?;
                b.remove_column(idx);
            }
            Ok(b)
        };
        match ext.as_str() {
            "parquet" | "pq" => {
                let mut sink = crate::data::parquet_io::ParquetSink::create_private(out, crate::data::schema::raw_schema(with_label), vec![])?;
                for b in batches {
                    crate::util::interrupt::check()?;
                    sink.write(&strip(b?)?)?;
                }
                crate::util::interrupt::check()?;
                sink.finish()
            }
            "csv" => {
                let mut f = AtomicFile::create_private(out)?;
                let label = if with_label { ",Converted" } else { "" };
                let failed = || format!("cannot write {}", out.display());
                writeln!(f.writer(), "Tenant_ID,Customer_ID,Sensitive_Data,Login_Count,Purchase_Amount,Last_Visit_Date{label}").with_context(failed)?;
                for b in batches {
                    crate::util::interrupt::check()?;
                    write_csv_rows(f.writer(), &strip(b?)?).with_context(failed)?;
                }
                crate::util::interrupt::check()?;
                f.commit()
            }
            _ => Err(crate::error::config(format!("{}: use a .csv or .parquet file name", out.display()))),
        }
    })();
    let _ = std::fs::remove_file(&tmp);
    result
}

fn tempfile_in(dir: &Path) -> Result<std::path::PathBuf> {
    Ok(dir.join(format!(".sample{}{}", crate::util::atomic::TEMP_MARKER, std::process::id())))
}
