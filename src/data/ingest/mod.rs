//! Reading a user's raw data (spec §2) from Parquet or CSV as a validated
//! stream of RecordBatches in `raw_schema` form.
//!
//! Every error names the file, the 1-based data row (and, for CSV, the line),
//! the column, what is wrong and how to fix it. Cell values and header names
//! are never shown: a value is described by position and shape
//! (`column 3, 31 characters, looks like an e-mail address`, see
//! [`crate::data::describe_value`]), because a headerless file's first row, or
//! swapped columns, put a `Sensitive_Data` value where a name or tenant id
//! was expected. The only values shown are tenant ids that are configured
//! (`config/tenants.yaml`, or the tenant the stage expects), escaped: a value
//! of tenant-id shape may still be PII (an SSN, a user name).
//!
//! Memory: constant per batch, except the duplicate check, which keeps one
//! (tenant index, Customer_ID) pair per row seen (~16-32 bytes/row in a
//! HashSet), and the per-tenant row counts.
//!
//! Files: `checks.rs` (the row rules), `csv_source.rs` and `parquet_source.rs`
//! (the two readers), `footer.rs` (a Parquet footer's schema depth, checked
//! before the decoder reads it); this file opens a file as a [`RawReader`]
//! and writes the validated Parquet.

mod checks;
mod csv_source;
mod footer;
mod parquet_source;

use checks::*;
pub use checks::{RowChecker, parse_customer_id, parse_login_count, parse_purchase_amount, parse_visit_date};
use csv_source::*;
pub use csv_source::{MAX_CSV_FIELD_BYTES, MAX_CSV_RECORD_BYTES, crlf_line_shift};
use parquet_source::*;

use crate::data::parquet_io::ParquetSink;
use crate::data::schema::*;
use crate::data::{describe_value, is_valid_tenant_id, show_tenant};
use anyhow::{Context, Result, anyhow, bail};
use arrow_array::builder::StringBuilder;
use arrow_array::cast::AsArray;
use arrow_array::types::*;
use arrow_array::{Array, ArrayRef, BooleanArray, Date32Array, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, SchemaRef, TimeUnit};
use parquet::arrow::arrow_reader::{ArrowReaderOptions, ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

/// Largest accepted `Login_Count`.
pub const MAX_LOGIN_COUNT: i64 = 1_000_000;
/// Longest `Sensitive_Data` value accepted, in bytes: an e-mail-like value
/// (an e-mail address is at most 254 characters), with room to spare; it
/// bounds what a compressed Parquet file can expand to (see `parquet_source`).
pub const MAX_SENSITIVE_BYTES: usize = 1024;
/// Largest accepted `Purchase_Amount`.
pub const MAX_PURCHASE_AMOUNT: f64 = 1e9;

/// What the reading stage expects of the file.
#[derive(Debug, Clone, Default)]
pub struct IngestOptions {
    /// Every row must belong to this tenant.
    pub expected_tenant: Option<String>,
    /// Every row's tenant must be one of these.
    pub known_tenants: Option<Vec<String>>,
    /// `Converted` must be present (training data).
    pub require_label: bool,
    /// `Converted` may be present; when false (and not required) a
    /// `Converted` column is an error.
    pub allow_label: bool,
    /// Dates after this day are rejected ("in the future relative to as_of").
    pub as_of: Option<i32>,
}

impl IngestOptions {
    /// What rows to score must be, for `predict` and `serve` alike (the two
    /// refuse the same rows with the same message): all of `tenant`, dated
    /// no later than the model's `as_of`, `Converted` allowed but not
    /// needed. `known_tenants` are the other tenants a refusal may name.
    pub fn for_scoring(tenant: &str, as_of: i32, known_tenants: Option<Vec<String>>) -> IngestOptions {
        IngestOptions { expected_tenant: Some(tenant.to_string()), known_tenants, require_label: false, allow_label: true, as_of: Some(as_of) }
    }
}

/// What [`validate_to_parquet`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct IngestSummary {
    pub rows: u64,
    pub has_label: bool,
    /// Rows with `Converted = true` (None without a label column).
    pub positives: Option<u64>,
    /// Rows per tenant.
    pub tenants: BTreeMap<String, u64>,
}

/// File format, chosen by extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Csv,
    Parquet,
}

/// `.csv` → CSV; `.parquet` / `.pq` → Parquet (case-insensitive).
pub fn format_of(path: &Path) -> Result<Format> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    match ext.as_str() {
        "csv" => Ok(Format::Csv),
        "parquet" | "pq" => Ok(Format::Parquet),
        _ => bail!("{}: unknown data file type; name the file *.csv (CSV with a header line) or *.parquet / *.pq (Parquet)", path.display()),
    }
}

/// A raw data file opened for reading: a regular file (a link to one is
/// fine). A FIFO, socket or device in its place is refused at once, naming
/// it, never waited on (a FIFO planted where a nightly `predict` reads would
/// hang it forever).
fn open_input(path: &Path) -> Result<File> {
    crate::util::open_regular(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::InvalidData {
            anyhow!("{} is not a regular file (a FIFO, socket or device); give a CSV or Parquet file", path.display())
        } else {
            anyhow::Error::from(e).context(format!("cannot open {}", path.display()))
        }
    })
}

fn expected_list(opts: &IngestOptions) -> String {
    let s = raw_schema(false);
    let names: Vec<&str> = s.fields().iter().map(|f| f.name().as_str()).collect();
    let names = names.join(", ");
    if opts.require_label {
        format!("{names}, {CONVERTED}")
    } else if opts.allow_label {
        format!("{names} (and {CONVERTED}, optional)")
    } else {
        names
    }
}

enum Source {
    Csv(CsvSource),
    Parquet(ParquetSource),
}

/// A validated stream of raw RecordBatches (`raw_schema(self.has_label())`).
/// After the first error it yields nothing more.
pub struct RawReader {
    source: Source,
    check: Checker,
    has_label: bool,
    schema: SchemaRef,
    batch_size: usize,
    done: bool,
}

impl RawReader {
    /// True when batches carry `Converted`.
    pub fn has_label(&self) -> bool {
        self.has_label
    }
    /// The schema of every batch.
    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }
    /// Data rows validated so far.
    pub fn rows(&self) -> u64 {
        self.check.rows
    }
    /// Rows with `Converted = true` so far.
    pub fn positives(&self) -> u64 {
        self.check.positives
    }
    /// Rows per tenant so far.
    pub fn tenant_rows(&self) -> BTreeMap<String, u64> {
        self.check.tenant_rows.iter().cloned().collect()
    }

    fn next_batch(&mut self) -> Result<Option<RecordBatch>> {
        let b = match &mut self.source {
            Source::Csv(c) => c.next_batch(&mut self.check, &self.schema, self.batch_size)?,
            Source::Parquet(p) => p.next_batch(&mut self.check, &self.schema)?,
        };
        match b {
            Some(b) if b.num_rows() > 0 => Ok(Some(b)),
            Some(_) => self.next_batch(),
            None if self.check.rows == 0 => {
                bail!("{} has no data rows; provide a file with at least one data row", self.check.file)
            }
            None => Ok(None),
        }
    }
}

impl Iterator for RawReader {
    type Item = Result<RecordBatch>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.next_batch() {
            Ok(Some(b)) => Some(Ok(b)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

/// ` (is it NAME spelt differently? names are exact)` when `n` is a raw
/// column's name but for letter case and punctuation (`login count`), else
/// empty: a hint that names only dagrun's own column, never `n`.
pub fn spelt_like(n: &str) -> String {
    let norm = |s: &str| s.chars().filter(|c| c.is_ascii_alphanumeric()).collect::<String>().to_ascii_lowercase();
    raw_schema(true)
        .fields()
        .iter()
        .find(|f| norm(f.name()) == norm(n))
        .map(|f| format!(" (is it {} spelt differently? names are exact)", f.name()))
        .unwrap_or_default()
}

/// Check the set of column names: exactly the raw columns, `Converted`
/// according to the options. Returns whether the label is present.
fn check_columns(file: &str, names: &[String], opts: &IngestOptions) -> Result<bool> {
    let label_ok = opts.allow_label || opts.require_label;
    let expected = raw_schema(true);
    let mut seen = HashSet::new();
    // Header names are described, never shown (module docs).
    let looks_like_data = names.iter().any(|n| {
        let d = describe_value(n);
        d.contains("e-mail") || d.contains("number") || d.contains("date") || d.contains("digits")
    });
    let hint = if looks_like_data { " The header line looks like a row of data: does the file lack its header line?" } else { "" };
    for (i, n) in names.iter().enumerate() {
        if !seen.insert(n.as_str()) {
            match expected.field_with_name(n) {
                Ok(f) => bail!("{file}: column {} ({}) appears twice; keep one", i + 1, f.name()),
                Err(_) => bail!("{file}: column {} ({}) repeats an earlier column name; keep one", i + 1, describe_value(n)),
            }
        }
        if expected.field_with_name(n).is_err() {
            let near = spelt_like(n);
            bail!(
                "{file}: line 1 (header), column {}: unexpected column name ({}){near}; expected exactly: {}.{hint}",
                i + 1,
                describe_value(n),
                expected_list(opts)
            );
        }
    }
    for f in raw_schema(false).fields() {
        if !seen.contains(f.name().as_str()) {
            bail!("{file}: missing column {}; expected exactly: {}", f.name(), expected_list(opts));
        }
    }
    let has_label = seen.contains(CONVERTED);
    if has_label && !label_ok {
        bail!("{file}: column Converted is not allowed here (this stage reads unlabelled data); remove the column");
    }
    if !has_label && opts.require_label {
        bail!("{file}: missing column Converted; this stage needs the label: add Converted (true/false) to every row");
    }
    Ok(has_label)
}

/// Open `path` (CSV or Parquet by extension) as a validated batch stream.
pub fn open_raw(path: &Path, opts: &IngestOptions, batch_size: usize) -> Result<RawReader> {
    let batch_size = batch_size.max(1);
    let check = Checker::new(path, opts);
    let (source, has_label) = match format_of(path)? {
        Format::Csv => {
            let (c, l) = CsvSource::open(path, opts)?;
            (Source::Csv(c), l)
        }
        Format::Parquet => {
            let (p, l) = ParquetSource::open(path, opts, batch_size)?;
            (Source::Parquet(p), l)
        }
    };
    Ok(RawReader { source, check, has_label, schema: raw_schema(has_label), batch_size, done: false })
}

/// Stream `input` into a validated raw Parquet file at `out`. On any error
/// nothing is written at `out` (and no temporary file is left).
pub fn validate_to_parquet(input: &Path, out: &Path, opts: &IngestOptions) -> Result<IngestSummary> {
    let mut reader = open_raw(input, opts, crate::data::DEFAULT_BATCH_SIZE)?;
    let mut kv = vec![("dagrun.dataset".to_string(), "raw".to_string())];
    if let Some(t) = &opts.expected_tenant {
        kv.push(("dagrun.tenant".to_string(), t.clone()));
    }
    if let Some(a) = opts.as_of {
        kv.push(("dagrun.as_of".to_string(), format_date(a)));
    }
    // Plaintext PII: 0600 from the first byte.
    let mut sink = ParquetSink::create_private(out, reader.schema(), kv)?;
    for b in reader.by_ref() {
        sink.write(&b?)?;
    }
    sink.finish()?;
    Ok(IngestSummary {
        rows: reader.rows(),
        has_label: reader.has_label(),
        positives: reader.has_label().then(|| reader.positives()),
        tenants: reader.tenant_rows(),
    })
}

// ---------------------------------------------------------------- rows from elsewhere

// ---------------------------------------------------------------- CSV

// ---------------------------------------------------------------- Parquet

thread_local! {
    /// Set while the Parquet decoder reads a user's file (see [`catch_decoder_panic`]).
    static IN_DECODER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

#[cfg(test)]
mod tests;
