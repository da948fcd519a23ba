//! Reading a user's raw data (spec §2) from Parquet or CSV as a validated
//! stream of RecordBatches in `raw_schema` form.
//!
//! Every error names the file, the 1-based data row (and, for CSV, the line),
//! the column, what is wrong and how to fix it. Cell values and header names
//! are never shown: a value is described by position and shape
//! (`column 3, 31 characters, looks like an e-mail address`, see
//! [`crate::data::describe_value`]), because a headerless file's first row, or
//! swapped columns, put a `Sensitive_Data` value where a name or tenant id
//! was expected. The only values shown are tenant ids that pass the tenant-id
//! rule (`[A-Za-z0-9_-]{1,64}`: no e-mail address, phone number with spaces
//! or name with a space fits), escaped.
//!
//! Memory: constant per batch, except the duplicate check, which keeps one
//! (tenant index, Customer_ID) pair per row seen (~16-32 bytes/row in a
//! HashSet), and the per-tenant row counts.

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
        _ => bail!(
            "{}: unknown data file type; name the file *.csv (CSV with a header line) or *.parquet / *.pq (Parquet)",
            path.display()
        ),
    }
}

fn expected_list(label: bool) -> String {
    let s = raw_schema(true);
    let mut names: Vec<&str> = s.fields().iter().map(|f| f.name().as_str()).collect();
    if !label {
        names.pop();
        names.push("[Converted]");
    }
    names.join(", ")
}

/// Per-row checks shared by the CSV and Parquet paths.
struct Checker {
    file: String,
    opts: IngestOptions,
    known: Option<HashSet<String>>,
    tenant_idx: HashMap<String, u32>,
    tenant_rows: Vec<(String, u64)>,
    last_tenant: Option<u32>,
    seen: HashSet<(u32, i64)>,
    rows: u64,
    positives: u64,
}

impl Checker {
    fn new(path: &Path, opts: &IngestOptions) -> Self {
        Self::named(path.display().to_string(), opts)
    }

    fn named(file: String, opts: &IngestOptions) -> Self {
        Checker {
            file,
            opts: opts.clone(),
            known: opts.known_tenants.as_ref().map(|v| v.iter().cloned().collect()),
            tenant_idx: HashMap::new(),
            tenant_rows: Vec::new(),
            last_tenant: None,
            seen: HashSet::new(),
            rows: 0,
            positives: 0,
        }
    }

    fn at(&self, row: u64, line: Option<u64>, col: &str) -> String {
        match line {
            Some(l) => format!("{}: row {row} (line {l}), column {col}", self.file),
            None => format!("{}: row {row}, column {col}", self.file),
        }
    }

    fn tenant(&mut self, row: u64, line: Option<u64>, t: &str) -> Result<u32> {
        if let Some(i) = self.last_tenant
            && self.tenant_rows[i as usize].0 == t
        {
            return Ok(i);
        }
        if let Some(&i) = self.tenant_idx.get(t) {
            self.last_tenant = Some(i);
            return Ok(i);
        }
        let at = self.at(row, line, TENANT_ID);
        if t.is_empty() {
            bail!("{at}: empty value; every row needs a tenant id");
        }
        if !is_valid_tenant_id(t) {
            bail!(
                "{at}: invalid tenant id ({}); a tenant id is 1-64 characters of A-Z a-z 0-9 _ -. Are the columns in the order the header names them?",
                describe_value(t)
            );
        }
        // From here on `t` has the shape of a tenant id (no '@', '.', space…).
        if let Some(exp) = &self.opts.expected_tenant
            && t != exp
        {
            bail!(
                "{at}: row belongs to tenant {} but this stage ingests tenant {}; give this stage a file holding only tenant {} rows",
                show_tenant(t),
                show_tenant(exp),
                show_tenant(exp)
            );
        }
        if let Some(k) = &self.known
            && !k.contains(t)
        {
            bail!("{at}: unknown tenant {}; add the tenant to config/tenants.yaml or remove its rows", show_tenant(t));
        }
        let i = self.tenant_rows.len() as u32;
        self.tenant_rows.push((t.to_string(), 0));
        self.tenant_idx.insert(t.to_string(), i);
        self.last_tenant = Some(i);
        Ok(i)
    }

    #[allow(clippy::too_many_arguments)]
    fn row(
        &mut self,
        row: u64,
        line: Option<u64>,
        tenant: &str,
        cid: i64,
        sensitive: Option<&str>,
        login: i64,
        purchase: f64,
        date: i32,
        label: Option<bool>,
    ) -> Result<()> {
        let t = self.tenant(row, line, tenant)?;
        if !self.seen.insert((t, cid)) {
            bail!(
                "{}: duplicate Customer_ID {cid} for tenant {}; each customer may appear once per tenant: remove or merge the duplicate rows",
                self.at(row, line, CUSTOMER_ID),
                show_tenant(&self.tenant_rows[t as usize].0)
            );
        }
        if sensitive.is_some_and(str::is_empty) {
            bail!("{}: empty value; every row needs Sensitive_Data", self.at(row, line, SENSITIVE_DATA));
        }
        if login < 0 {
            bail!("{}: negative value; Login_Count must be >= 0", self.at(row, line, LOGIN_COUNT));
        }
        if login > MAX_LOGIN_COUNT {
            bail!(
                "{}: value above the bound {MAX_LOGIN_COUNT}; Login_Count must be <= {MAX_LOGIN_COUNT}: check the column is a count of logins",
                self.at(row, line, LOGIN_COUNT)
            );
        }
        check_purchase(purchase, || self.at(row, line, PURCHASE_AMOUNT))?;
        if date < 0 {
            bail!("{}: date before 1970-01-01; dates must be 1970-01-01 or later", self.at(row, line, LAST_VISIT_DATE));
        }
        if let Some(as_of) = self.opts.as_of
            && date > as_of
        {
            bail!(
                "{}: date in the future relative to as_of ({}); fix the date or run with a later as_of",
                self.at(row, line, LAST_VISIT_DATE),
                format_date(as_of)
            );
        }
        self.tenant_rows[t as usize].1 += 1;
        self.rows += 1;
        self.positives += u64::from(label == Some(true));
        Ok(())
    }
}

/// `at` names the place (only called for a message: no formatting per row).
fn check_purchase(v: f64, at: impl Fn() -> String) -> Result<()> {
    if v.is_nan() {
        bail!("{}: NaN; Purchase_Amount must be a finite number >= 0", at());
    }
    if v.is_infinite() {
        bail!("{}: infinite value; Purchase_Amount must be a finite number >= 0", at());
    }
    if v < 0.0 {
        bail!("{}: negative value; Purchase_Amount must be >= 0", at());
    }
    if v > MAX_PURCHASE_AMOUNT {
        bail!("{}: value above the bound 1e9; Purchase_Amount must be <= 1000000000: check the unit and the column", at());
    }
    Ok(())
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
            let norm = |s: &str| s.chars().filter(|c| c.is_ascii_alphanumeric()).collect::<String>().to_ascii_lowercase();
            let near = expected.fields().iter().find(|f| norm(f.name()) == norm(n)).map(|f| format!(" (is it {} spelt differently? names are exact)", f.name())).unwrap_or_default();
            bail!(
                "{file}: line 1 (header), column {}: unexpected column name ({}){near}; expected exactly: {}.{hint}",
                i + 1,
                describe_value(n),
                expected_list(label_ok)
            );
        }
    }
    for f in raw_schema(false).fields() {
        if !seen.contains(f.name().as_str()) {
            bail!("{file}: missing column {}; expected exactly: {}", f.name(), expected_list(label_ok));
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

/// The row rules of [`open_raw`] for rows that do not come from a file (the
/// body of an HTTP scoring request): the same checks, in the same order, with
/// the same messages; `origin` takes the place of the file name.
pub struct RowChecker(Checker);

impl RowChecker {
    pub fn new(origin: &str, opts: &IngestOptions) -> RowChecker {
        RowChecker(Checker::named(origin.to_string(), opts))
    }

    /// Make room for `rows` rows (the duplicate check's set), when known.
    pub fn reserve(&mut self, rows: usize) {
        self.0.seen.reserve(rows);
    }

    /// "ORIGIN: row R[ (line L)], column C", the place every message starts with.
    pub fn at(&self, row: u64, line: Option<u64>, col: &str) -> String {
        self.0.at(row, line, col)
    }

    /// Check one row (1-based `row`). `sensitive` is None when the source has
    /// no `Sensitive_Data` column.
    #[allow(clippy::too_many_arguments)]
    pub fn row(&mut self, row: u64, line: Option<u64>, tenant: &str, cid: i64, sensitive: Option<&str>, login: i64, purchase: f64, date: i32) -> Result<()> {
        self.0.row(row, line, tenant, cid, sensitive, login, purchase, date, None)
    }
}

/// A `Customer_ID` cell given as text. `at` names the place.
pub fn parse_customer_id(s: &str, at: impl Fn() -> String) -> Result<i64> {
    s.trim().parse().map_err(|_| anyhow!("{}: not an integer (int64); write the customer id as a whole number", at()))
}

/// A `Login_Count` cell given as text.
pub fn parse_login_count(s: &str, at: impl Fn() -> String) -> Result<i64> {
    let lc = s.trim();
    lc.parse().map_err(|_| {
        if lc.starts_with('-') && lc.len() > 1 && lc[1..].bytes().all(|b| b.is_ascii_digit()) {
            anyhow!("{}: negative value; Login_Count must be >= 0", at())
        } else if !lc.is_empty() && lc.bytes().all(|b| b.is_ascii_digit()) {
            anyhow!("{}: value above the bound {MAX_LOGIN_COUNT}; Login_Count must be <= {MAX_LOGIN_COUNT}", at())
        } else {
            anyhow!("{}: not an integer; write Login_Count as a whole number >= 0", at())
        }
    })
}

/// A `Purchase_Amount` cell given as text.
pub fn parse_purchase_amount(s: &str, at: impl Fn() -> String) -> Result<f64> {
    s.trim().parse().map_err(|_| anyhow!("{}: not a number; write Purchase_Amount as a decimal number such as 12.50", at()))
}

/// A `Last_Visit_Date` cell given as text (`YYYY-MM-DD`).
pub fn parse_visit_date(s: &str, at: impl Fn() -> String) -> Result<i32> {
    parse_date(s.trim()).map_err(|e| anyhow!("{}: {e}; write dates as YYYY-MM-DD", at()))
}

// ---------------------------------------------------------------- CSV

/// Longest CSV record (line) accepted, in bytes; checked while reading, so a
/// file without line breaks never fills memory.
pub const MAX_CSV_RECORD_BYTES: u64 = 1 << 20;
/// Longest CSV field accepted, in bytes.
pub const MAX_CSV_FIELD_BYTES: usize = 64 << 10;

/// A reader that fails once more than [`MAX_CSV_RECORD_BYTES`] (plus the csv
/// reader's buffer) are read without a record ending: the source moves
/// `mark` to `read` after every record.
struct Capped {
    inner: File,
    read: u64,
    mark: u64,
}

/// The csv reader's buffer (its reads are at most this long).
const CSV_BUFFER: usize = 64 << 10;

impl std::io::Read for Capped {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.read.saturating_sub(self.mark) > MAX_CSV_RECORD_BYTES + CSV_BUFFER as u64 {
            return Err(std::io::Error::other(format!(
                "a row is longer than {MAX_CSV_RECORD_BYTES} bytes (1 MiB), the most a CSV row may be; is this a CSV file with one row per line?"
            )));
        }
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        Ok(n)
    }
}

impl CsvSource {
    /// A record ended: the next one may again be [`MAX_CSV_RECORD_BYTES`] long.
    fn record_done(&mut self) {
        let r = self.rdr.get_ref().read;
        self.rdr.get_mut().mark = r;
    }
}

struct CsvSource {
    rdr: csv::Reader<Capped>,
    /// Index in the record of each raw_schema(true) column (Converted may be absent).
    idx: [Option<usize>; 7],
    width: usize,
    rec: csv::ByteRecord,
    row: u64,
}

impl CsvSource {
    fn open(path: &Path, opts: &IngestOptions) -> Result<(Self, bool)> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let fname = path.display().to_string();
        let capped = Capped { inner: file, read: 0, mark: 0 };
        let mut rdr = csv::ReaderBuilder::new().has_headers(true).flexible(true).buffer_capacity(CSV_BUFFER).from_reader(capped);
        let header = rdr.byte_headers().map_err(|e| csv_err(&fname, e, None))?.clone();
        if let Some(i) = header.iter().position(|h| h.len() > MAX_CSV_FIELD_BYTES) {
            bail!("{fname}: line 1 (header), column {}: a column name of {} bytes; a field may be at most {MAX_CSV_FIELD_BYTES} bytes", i + 1, header[i].len());
        }
        if header.is_empty() || (header.len() == 1 && header[0].is_empty()) {
            bail!("{fname} is empty (no header line); a CSV file needs a header line naming the columns and at least one data row");
        }
        let mut names = Vec::with_capacity(header.len());
        for (i, h) in header.iter().enumerate() {
            let h = if i == 0 { h.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(h) } else { h };
            let s = std::str::from_utf8(h).map_err(|_| {
                anyhow!("{fname}: line 1 (header), column {}: not valid UTF-8; save the file as UTF-8", i + 1)
            })?;
            names.push(s.to_string());
        }
        let has_label = check_columns(&fname, &names, opts)?;
        let mut idx = [None; 7];
        for (k, f) in raw_schema(true).fields().iter().enumerate() {
            idx[k] = names.iter().position(|n| n == f.name());
        }
        let mut src = CsvSource { rdr, idx, width: names.len(), rec: csv::ByteRecord::new(), row: 0 };
        src.record_done();
        Ok((src, has_label))
    }

    fn next_batch(&mut self, ck: &mut Checker, schema: &SchemaRef, batch_size: usize) -> Result<Option<RecordBatch>> {
        let has_label = self.idx[6].is_some();
        let mut tenants = StringBuilder::with_capacity(batch_size.min(1 << 16), 1024);
        let mut sens = StringBuilder::with_capacity(batch_size.min(1 << 16), 1024);
        let (mut cid, mut login, mut amt, mut date, mut label) = (vec![], vec![], vec![], vec![], vec![]);
        while cid.len() < batch_size {
            let more = self.rdr.read_byte_record(&mut self.rec).map_err(|e| csv_err(&ck.file, e, Some(self.row + 1)))?;
            if !more {
                break;
            }
            self.record_done();
            self.row += 1;
            let row = self.row;
            let line = self.rec.position().map(|p| p.line());
            if let Some(j) = self.rec.iter().position(|f| f.len() > MAX_CSV_FIELD_BYTES) {
                let name = self.idx.iter().position(|&x| x == Some(j)).map(|k| raw_schema(true).field(k).name().clone());
                bail!(
                    "{}: row {row}{}, column {}{}: a value of {} bytes; a field may be at most {MAX_CSV_FIELD_BYTES} bytes (64 KiB): check the quoting",
                    ck.file,
                    line.map(|l| format!(" (line {l})")).unwrap_or_default(),
                    j + 1,
                    name.map(|n| format!(" ({n})")).unwrap_or_default(),
                    self.rec[j].len()
                );
            }
            if self.rec.len() != self.width {
                bail!(
                    "{}: row {row}{}: has {} fields but the header has {}; quote fields that contain commas, and give every row one value per column",
                    ck.file,
                    line.map(|l| format!(" (line {l})")).unwrap_or_default(),
                    self.rec.len(),
                    self.width
                );
            }
            let rec = &self.rec;
            let field = |k: usize, name: &str| -> Result<&str> {
                let raw = &rec[self.idx[k].unwrap_or(0)];
                let s = std::str::from_utf8(raw)
                    .map_err(|_| anyhow!("{}: not valid UTF-8; save the file as UTF-8", ck.at(row, line, name)))?;
                if s.is_empty() {
                    bail!("{}: empty value (nulls are not allowed); fill in every cell", ck.at(row, line, name));
                }
                Ok(s)
            };
            let t = field(0, TENANT_ID)?;
            let c = parse_customer_id(field(1, CUSTOMER_ID)?, || ck.at(row, line, CUSTOMER_ID))?;
            let s = field(2, SENSITIVE_DATA)?;
            let l = parse_login_count(field(3, LOGIN_COUNT)?, || ck.at(row, line, LOGIN_COUNT))?;
            let a = parse_purchase_amount(field(4, PURCHASE_AMOUNT)?, || ck.at(row, line, PURCHASE_AMOUNT))?;
            let d = parse_visit_date(field(5, LAST_VISIT_DATE)?, || ck.at(row, line, LAST_VISIT_DATE))?;
            let y = if has_label {
                let v = field(6, CONVERTED)?.trim();
                Some(match v.to_ascii_lowercase().as_str() {
                    "true" | "1" => true,
                    "false" | "0" => false,
                    _ => bail!("{}: not a boolean; write true/false or 1/0", ck.at(row, line, CONVERTED)),
                })
            } else {
                None
            };
            ck.row(row, line, t, c, Some(s), l, a, d, y)?;
            tenants.append_value(t);
            sens.append_value(s);
            cid.push(c);
            login.push(l);
            amt.push(a);
            date.push(d);
            if let Some(y) = y {
                label.push(y);
            }
        }
        if cid.is_empty() {
            return Ok(None);
        }
        let mut cols: Vec<ArrayRef> = vec![
            Arc::new(tenants.finish()),
            Arc::new(Int64Array::from(cid)),
            Arc::new(sens.finish()),
            Arc::new(Int64Array::from(login)),
            Arc::new(Float64Array::from(amt)),
            Arc::new(Date32Array::from(date)),
        ];
        if has_label {
            cols.push(Arc::new(BooleanArray::from(label)));
        }
        Ok(Some(RecordBatch::try_new(schema.clone(), cols)?))
    }
}

/// A csv error as a message that never contains field contents.
fn csv_err(file: &str, e: csv::Error, row: Option<u64>) -> anyhow::Error {
    let line = e.position().map(|p| format!(" (line {})", p.line())).unwrap_or_default();
    let row = row.map(|r| format!(": row {r}")).unwrap_or_default();
    match e.kind() {
        csv::ErrorKind::Io(io) => anyhow!("cannot read {file}{row}{line}: {io}"),
        csv::ErrorKind::Utf8 { .. } => anyhow!("{file}{row}{line}: not valid UTF-8; save the file as UTF-8"),
        _ => anyhow!("{file}{row}{line}: malformed CSV; check quoting and that every row has one value per column"),
    }
}

// ---------------------------------------------------------------- Parquet

struct ParquetSource {
    reader: ParquetRecordBatchReader,
    /// Column index in the file of each raw_schema(true) column.
    idx: [Option<usize>; 7],
    row: u64,
}

fn type_ok(col: &str, dt: &DataType) -> bool {
    use DataType::*;
    let int = matches!(dt, Int8 | Int16 | Int32 | Int64 | UInt8 | UInt16 | UInt32 | UInt64);
    match col {
        TENANT_ID | SENSITIVE_DATA => matches!(dt, Utf8 | LargeUtf8 | Utf8View),
        CUSTOMER_ID | LOGIN_COUNT => int,
        PURCHASE_AMOUNT => int || matches!(dt, Float32 | Float64),
        LAST_VISIT_DATE => matches!(dt, Date32 | Date64 | Timestamp(_, _) | Utf8 | LargeUtf8 | Utf8View),
        CONVERTED => matches!(dt, Boolean),
        _ => false,
    }
}

fn wanted_type(col: &str) -> &'static str {
    match col {
        TENANT_ID | SENSITIVE_DATA => "utf8 (string)",
        CUSTOMER_ID | LOGIN_COUNT => "int64 (or a smaller integer type)",
        PURCHASE_AMOUNT => "float64 (or float32 / an integer type)",
        LAST_VISIT_DATE => "date32 (or date64, a midnight timestamp, or YYYY-MM-DD strings)",
        _ => "bool",
    }
}

impl ParquetSource {
    fn open(path: &Path, opts: &IngestOptions, batch_size: usize) -> Result<(Self, bool)> {
        let fname = path.display().to_string();
        let file = File::open(path).with_context(|| format!("cannot open {fname}"))?;
        if file.metadata().map(|m| m.len() == 0).unwrap_or(false) {
            bail!("{fname} is empty (0 bytes); provide a Parquet file with at least one data row");
        }
        // Types are taken from the Parquet schema itself (not the embedded
        // Arrow schema), which normalises large/view/dictionary string variants.
        let file_len = file.metadata().map(|m| m.len()).unwrap_or(u64::MAX);
        let opened = catch_decoder_panic(|| {
            ParquetRecordBatchReaderBuilder::try_new_with_options(file, ArrowReaderOptions::new().with_skip_arrow_metadata(true))
        })
        .map_err(|_| anyhow!("{fname} is not a readable Parquet file (corrupt footer); write it with a Parquet writer such as pyarrow"))?;
        let b = opened
            .map_err(|e| anyhow!("{fname} is not a readable Parquet file ({e}); write it with a Parquet writer such as pyarrow"))?;
        let schema = b.schema().clone();
        let names: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
        let has_label = check_columns(&fname, &names, opts)?;
        let mut idx = [None; 7];
        for (k, f) in raw_schema(true).fields().iter().enumerate() {
            idx[k] = names.iter().position(|n| n == f.name());
            if let Some(i) = idx[k] {
                let dt = schema.field(i).data_type();
                if !type_ok(f.name(), dt) {
                    bail!("{fname}: column {} has type {dt} but {} is expected; convert the column", f.name(), wanted_type(f.name()));
                }
            }
        }
        // The decoder asserts (panics) on a column chunk with a negative
        // offset or size: check every chunk's byte range first.
        for (g, rg) in b.metadata().row_groups().iter().enumerate() {
            for (j, c) in rg.columns().iter().enumerate() {
                let start = c.dictionary_page_offset().unwrap_or(c.data_page_offset());
                let len = c.compressed_size();
                let inside = start >= 0 && len >= 0 && (start as u64).checked_add(len as u64).is_some_and(|end| end <= file_len);
                if !inside {
                    bail!(
                        "{fname}: corrupt Parquet metadata: row group {g}, column chunk {}: byte range outside the file; rewrite the file with a Parquet writer such as pyarrow",
                        j + 1
                    );
                }
            }
        }
        if b.metadata().file_metadata().num_rows() <= 0 {
            bail!("{fname} has no data rows; provide a file with at least one data row");
        }
        let reader = b
            .with_batch_size(batch_size)
            .build()
            .map_err(|e| anyhow!("{fname} is not a readable Parquet file ({e})"))?;
        Ok((ParquetSource { reader, idx, row: 0 }, has_label))
    }

    fn next_batch(&mut self, ck: &mut Checker, schema: &SchemaRef) -> Result<Option<RecordBatch>> {
        // A user's file may be corrupt in ways the decoder does not expect:
        // turn a decoder panic into an error rather than a crash.
        let next = catch_decoder_panic(|| self.reader.next())
            .map_err(|_| anyhow!("{}: corrupt Parquet data after row {}; rewrite the file with a Parquet writer", ck.file, self.row))?;
        let b = match next {
            None => return Ok(None),
            Some(r) => r.map_err(|e| anyhow!("{}: cannot read Parquet data after row {} ({e})", ck.file, self.row))?,
        };
        let base = self.row;
        let names = raw_schema(true);
        let col = |k: usize| -> Result<&ArrayRef> {
            let a = b.column(self.idx[k].unwrap_or(0));
            if a.null_count() > 0 {
                let i = (0..a.len()).find(|&i| a.is_null(i)).unwrap_or(0);
                bail!("{}: null value (nulls are not allowed); fill in every cell", ck.at(base + i as u64 + 1, None, names.field(k).name()));
            }
            Ok(a)
        };
        let at = |i: usize, k: usize| ck.at(base + i as u64 + 1, None, names.field(k).name());
        let tenant = to_utf8(col(0)?);
        let cid = to_i64(col(1)?, |i| at(i, 1))?;
        let sens = to_utf8(col(2)?);
        let login = to_i64(col(3)?, |i| at(i, 3))?;
        let amt = to_f64(col(4)?);
        let date = to_date32(col(5)?, |i| at(i, 5))?;
        let label = match self.idx[6] {
            Some(_) => Some(col(6)?.as_boolean().clone()),
            None => None,
        };
        for i in 0..b.num_rows() {
            let row = base + i as u64 + 1;
            ck.row(
                row,
                None,
                tenant.value(i),
                cid.value(i),
                Some(sens.value(i)),
                login.value(i),
                amt.value(i),
                date.value(i),
                label.as_ref().map(|l| l.value(i)),
            )?;
        }
        self.row += b.num_rows() as u64;
        let mut cols: Vec<ArrayRef> = vec![
            Arc::new(tenant),
            Arc::new(cid),
            Arc::new(sens),
            Arc::new(login),
            Arc::new(amt),
            Arc::new(date),
        ];
        if let Some(l) = label {
            cols.push(Arc::new(l));
        }
        Ok(Some(RecordBatch::try_new(schema.clone(), cols)?))
    }
}

thread_local! {
    /// Set while the Parquet decoder reads a user's file (see [`catch_decoder_panic`]).
    static IN_DECODER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Run the Parquet decoder on a user's file, turning a panic of the decoder on
/// corrupt input into an `Err` *without* printing it: the panic hook (wrapped
/// once, delegating to the previous hook everywhere else) stays silent while
/// this thread is inside the decoder, so the user sees one clear error, not a
/// backtrace. The caller words the error.
fn catch_decoder_panic<R>(f: impl FnOnce() -> R) -> std::thread::Result<R> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !IN_DECODER.with(std::cell::Cell::get) {
                previous(info)
            }
        }));
    });
    let was = IN_DECODER.with(|q| q.replace(true));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    IN_DECODER.with(|q| q.set(was));
    r
}

fn to_utf8(a: &ArrayRef) -> StringArray {
    match a.data_type() {
        DataType::Utf8 => a.as_string::<i32>().clone(),
        DataType::LargeUtf8 => StringArray::from_iter_values(a.as_string::<i64>().iter().map(|v| v.unwrap_or(""))),
        _ => StringArray::from_iter_values(a.as_string_view().iter().map(|v| v.unwrap_or(""))),
    }
}

fn to_i64(a: &ArrayRef, at: impl Fn(usize) -> String) -> Result<Int64Array> {
    macro_rules! widen {
        ($t:ty) => {
            Int64Array::from_iter_values(a.as_primitive::<$t>().values().iter().map(|&v| v as i64))
        };
    }
    Ok(match a.data_type() {
        DataType::Int64 => a.as_primitive::<Int64Type>().clone(),
        DataType::Int32 => widen!(Int32Type),
        DataType::Int16 => widen!(Int16Type),
        DataType::Int8 => widen!(Int8Type),
        DataType::UInt32 => widen!(UInt32Type),
        DataType::UInt16 => widen!(UInt16Type),
        DataType::UInt8 => widen!(UInt8Type),
        DataType::UInt64 => {
            let v = a.as_primitive::<UInt64Type>().values();
            if let Some(i) = v.iter().position(|&x| x > i64::MAX as u64) {
                bail!("{}: value above the int64 range; values must fit in a signed 64-bit integer", at(i));
            }
            Int64Array::from_iter_values(v.iter().map(|&x| x as i64))
        }
        dt => bail!("{}: unsupported type {dt}", at(0)),
    })
}

fn to_f64(a: &ArrayRef) -> Float64Array {
    macro_rules! widen {
        ($t:ty) => {
            Float64Array::from_iter_values(a.as_primitive::<$t>().values().iter().map(|&v| v as f64))
        };
    }
    match a.data_type() {
        DataType::Float64 => a.as_primitive::<Float64Type>().clone(),
        DataType::Float32 => widen!(Float32Type),
        DataType::Int64 => widen!(Int64Type),
        DataType::Int32 => widen!(Int32Type),
        DataType::Int16 => widen!(Int16Type),
        DataType::Int8 => widen!(Int8Type),
        DataType::UInt64 => widen!(UInt64Type),
        DataType::UInt32 => widen!(UInt32Type),
        DataType::UInt16 => widen!(UInt16Type),
        _ => widen!(UInt8Type),
    }
}

fn to_date32(a: &ArrayRef, at: impl Fn(usize) -> String) -> Result<Date32Array> {
    const DAY_MS: i64 = 86_400_000;
    let from_units = |vals: &[i64], per_day: i64| -> Result<Date32Array> {
        let mut out = Vec::with_capacity(vals.len());
        for (i, &v) in vals.iter().enumerate() {
            if v.rem_euclid(per_day) != 0 {
                bail!("{}: timestamp with a time of day; store dates (date32) or midnight timestamps", at(i));
            }
            let d = v.div_euclid(per_day);
            out.push(i32::try_from(d).map_err(|_| anyhow!("{}: date out of range; use a date between 1970-01-01 and as_of", at(i)))?);
        }
        Ok(Date32Array::from(out))
    };
    match a.data_type() {
        DataType::Date32 => Ok(a.as_primitive::<Date32Type>().clone()),
        DataType::Date64 => from_units(a.as_primitive::<Date64Type>().values(), DAY_MS),
        DataType::Timestamp(unit, _) => {
            let per_day = match unit {
                TimeUnit::Second => 86_400,
                TimeUnit::Millisecond => DAY_MS,
                TimeUnit::Microsecond => DAY_MS * 1000,
                TimeUnit::Nanosecond => DAY_MS * 1_000_000,
            };
            let vals: Vec<i64> = match unit {
                TimeUnit::Second => a.as_primitive::<TimestampSecondType>().values().to_vec(),
                TimeUnit::Millisecond => a.as_primitive::<TimestampMillisecondType>().values().to_vec(),
                TimeUnit::Microsecond => a.as_primitive::<TimestampMicrosecondType>().values().to_vec(),
                TimeUnit::Nanosecond => a.as_primitive::<TimestampNanosecondType>().values().to_vec(),
            };
            from_units(&vals, per_day)
        }
        _ => {
            let s = to_utf8(a);
            let mut out = Vec::with_capacity(s.len());
            for i in 0..s.len() {
                out.push(parse_date(s.value(i)).map_err(|e| anyhow!("{}: {e}; write dates as YYYY-MM-DD", at(i)))?);
            }
            Ok(Date32Array::from(out))
        }
    }
}

#[cfg(test)]
mod tests;
