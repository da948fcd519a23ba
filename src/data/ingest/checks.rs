//! The row rules of spec §2, shared by the CSV and Parquet readers (and by
//! `predict`'s input): ids, counts, amounts and dates in range, tenants
//! known, no duplicate (tenant, Customer_ID).
//!
//! Rules: an error names the file, the 1-based data row and the column, and
//! describes a bad value by position and shape, never by its text.

use super::*;

/// Per-row checks shared by the CSV and Parquet paths.
pub(super) struct Checker {
    pub(super) file: String,
    pub(super) opts: IngestOptions,
    pub(super) known: Option<HashSet<String>>,
    pub(super) tenant_idx: HashMap<String, u32>,
    pub(super) tenant_rows: Vec<(String, u64)>,
    pub(super) last_tenant: Option<u32>,
    pub(super) seen: HashSet<(u32, i64)>,
    pub(super) rows: u64,
    pub(super) positives: u64,
}

impl Checker {
    pub(super) fn new(path: &Path, opts: &IngestOptions) -> Self {
        Self::named(path.display().to_string(), opts)
    }

    pub(super) fn named(file: String, opts: &IngestOptions) -> Self {
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

    pub(super) fn at(&self, row: u64, line: Option<u64>, col: &str) -> String {
        match line {
            Some(l) => format!("{}: row {row} (line {l}), column {col}", self.file),
            None => format!("{}: row {row}, column {col}", self.file),
        }
    }

    /// A tenant id from a row, for a message: quoted when it is a configured
    /// (or the expected) tenant, else only described.
    fn show(&self, t: &str) -> String {
        let configured = self.known.as_ref().is_some_and(|k| k.contains(t)) || self.opts.expected_tenant.as_deref() == Some(t);
        if configured { show_tenant(t) } else { format!("({})", describe_value(t)) }
    }

    pub(super) fn tenant(&mut self, row: u64, line: Option<u64>, t: &str) -> Result<u32> {
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
        // From here on `t` has the shape of a tenant id (no '@', '.', space…),
        // but may still be PII of that shape (an SSN, a user name): it is
        // shown only if it is a configured tenant, else described.
        if let Some(exp) = &self.opts.expected_tenant
            && t != exp
        {
            bail!("{at}: row belongs to tenant {}, but only tenant {} rows are accepted here; remove the other tenants' rows", self.show(t), show_tenant(exp));
        }
        if let Some(k) = &self.known
            && !k.contains(t)
        {
            bail!("{at}: unknown tenant ({}); add the tenant to config/tenants.yaml or remove its rows", describe_value(t));
        }
        let i = self.tenant_rows.len() as u32;
        self.tenant_rows.push((t.to_string(), 0));
        self.tenant_idx.insert(t.to_string(), i);
        self.last_tenant = Some(i);
        Ok(i)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn row(
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
                "{}: duplicate Customer_ID: an earlier row of tenant {} has the same one; each customer may appear once per tenant: remove or merge the duplicate rows",
                self.at(row, line, CUSTOMER_ID),
                self.show(&self.tenant_rows[t as usize].0)
            );
        }
        if sensitive.is_some_and(str::is_empty) {
            bail!("{}: empty value; every row needs Sensitive_Data", self.at(row, line, SENSITIVE_DATA));
        }
        if let Some(s) = sensitive
            && s.len() > MAX_SENSITIVE_BYTES
        {
            bail!(
                "{}: a value of {} bytes; Sensitive_Data is an e-mail-like value of at most {MAX_SENSITIVE_BYTES} bytes",
                self.at(row, line, SENSITIVE_DATA),
                s.len()
            );
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
pub(super) fn check_purchase(v: f64, at: impl Fn() -> String) -> Result<()> {
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
