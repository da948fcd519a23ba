//! Request bodies -> validated raw rows, for both protocols.
//!
//! Rules:
//! - The row rules are `predict`'s, applied by the same code
//!   ([`crate::data::ingest::RowChecker`] and the ingest cell parsers), with
//!   the same messages; `request` takes the place of the file name
//!   (`request: row 3, column Login_Count: negative value; …`). The first bad
//!   row refuses the whole request: nothing is scored.
//! - Columns: `Customer_ID`, `Login_Count`, `Purchase_Amount`,
//!   `Last_Visit_Date` are required; `Tenant_ID` (must be the model's tenant),
//!   `Sensitive_Data` (checked non-empty, never used, never echoed) and
//!   `Converted` are accepted so that `predict`'s input rows can be posted as
//!   they are. Any other column is refused.
//! - No message ever contains a cell value: JSON errors are reported by
//!   line and column only, since serde's own messages may quote the input.
//!   An unknown column name or datatype is described, never shown (a
//!   headerless CSV's first row, or a mistake, may be personal data:
//!   `unknown column (20 characters, looks like an e-mail address)`), as
//!   `predict` does; tenant ids are shown escaped and shortened.
//! - Memory is bounded by the row limit while parsing, not after: a body may
//!   create at most [`value_budget`] values (cells, records, rows, column
//!   names, shape entries; an OIP input tensor counts [`INPUT_COST`]), so a few
//!   bytes of JSON each (`{}`, `[]`, `0`) can never become hundreds of bytes
//!   each for megabytes; past it the request is refused with 413.
//! - An OIP tensor's values must be of its datatype, and nested only as its
//!   shape says (`[rows]` flat, `[rows, 1]` flat or one value per list).
//! - Parsing borrows from the body where it can (strings without escapes).

use crate::data::describe_value;
use crate::data::ingest::{self, IngestOptions, RowChecker};
use crate::data::schema;
use serde::Deserialize;
use serde::de::{Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use std::borrow::Cow;
use std::fmt;

/// Name of the request in messages (where `predict` names its file).
pub const ORIGIN: &str = "request";

/// Why a request body was refused.
#[derive(Debug)]
pub enum Refused {
    /// 400 with this message.
    Bad(String),
    /// 413: more rows than the limit.
    TooManyRows(String),
}

impl From<anyhow::Error> for Refused {
    fn from(e: anyhow::Error) -> Self {
        Refused::Bad(format!("{e:#}"))
    }
}

thread_local! {
    /// Values the body being parsed on this thread may still create
    /// ([`parse_within`]); unlimited outside a parse.
    static VALUES_LEFT: std::cell::Cell<usize> = const { std::cell::Cell::new(usize::MAX) };
}

/// What a `dataframe_records` object costs against the budget: its slots
/// (one per column) and itself, whatever it holds (`{}` included).
const RECORD_COST: usize = ALL.len() + 1;

/// Values a request of `max_rows` rows may hold: per row, a record (or a
/// row list) and a cell per column, and a few more. A request of `max_rows`
/// full rows in any shape fits; tiny values (`{}`, `[]`, `0`) stop there,
/// at about 256 bytes of memory per row.
pub fn value_budget(max_rows: usize) -> usize {
    max_rows.saturating_mul(RECORD_COST + ALL.len()).saturating_add(64)
}

/// Count `n` values against the budget of the parse under way.
fn take_values<E: serde::de::Error>(n: usize) -> Result<(), E> {
    VALUES_LEFT.with(|left| match left.get().checked_sub(n) {
        None => {
            left.set(0);
            Err(E::custom("over the value budget"))
        }
        Some(rest) => {
            left.set(rest);
            Ok(())
        }
    })
}

/// Count one value.
fn take_value<E: serde::de::Error>() -> Result<(), E> {
    take_values(1)
}

/// What an OIP input tensor costs against the budget (itself: a name, a
/// shape, a datatype and a data list), besides its shape and data values.
const INPUT_COST: usize = 4;

/// A list whose every element costs one value (`columns`, `shape`): a few
/// bytes of JSON each (`""`, `0`) must not become tens of bytes each.
fn counted<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Vec<T>, D::Error> {
    counted_at(d, 1)
}

/// A list of OIP inputs: each costs [`INPUT_COST`] values.
fn counted_inputs<'de: 'a, 'a, D: Deserializer<'de>>(d: D) -> Result<Vec<OipInput<'a>>, D::Error> {
    counted_at(d, INPUT_COST)
}

fn counted_at<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D, cost: usize) -> Result<Vec<T>, D::Error> {
    struct V<T>(usize, std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a list")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Vec<T>, A::Error> {
            let mut out = Vec::new();
            loop {
                take_values::<A::Error>(self.0)?;
                match a.next_element::<T>()? {
                    Some(x) => out.push(x),
                    None => return Ok(out),
                }
            }
        }
    }
    d.deserialize_seq(V(cost, std::marker::PhantomData))
}

/// Parse `body` as JSON within the value budget of `max_rows` rows; `what`
/// is the shape to ask for in a message.
fn parse_within<'b, T: Deserialize<'b>>(body: &'b [u8], max_rows: usize, what: &str) -> Result<T, Refused> {
    let before = VALUES_LEFT.replace(value_budget(max_rows));
    let parsed = serde_json::from_slice(body);
    let left = VALUES_LEFT.replace(before);
    parsed.map_err(|e| {
        if left == 0 {
            Refused::TooManyRows(format!(
                "{ORIGIN} holds more values than {max_rows} rows can (the limit is {max_rows} rows per request, dagrun serve --max-rows): split it"
            ))
        } else {
            json_error(&e, what)
        }
    })
}

/// Validated rows, column by column.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Rows {
    pub ids: Vec<i64>,
    pub logins: Vec<i64>,
    pub amounts: Vec<f64>,
    /// Days since 1970-01-01.
    pub dates: Vec<i32>,
}

impl Rows {
    pub fn len(&self) -> usize {
        self.ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// The columns a request may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Col {
    Tenant = 0,
    Cid = 1,
    Sensitive = 2,
    Login = 3,
    Amount = 4,
    Date = 5,
    Converted = 6,
}

const ALL: [Col; 7] = [Col::Tenant, Col::Cid, Col::Sensitive, Col::Login, Col::Amount, Col::Date, Col::Converted];
const REQUIRED: [Col; 4] = [Col::Cid, Col::Login, Col::Amount, Col::Date];

impl Col {
    pub fn of(name: &str) -> Option<Col> {
        Some(match name {
            schema::TENANT_ID => Col::Tenant,
            schema::CUSTOMER_ID => Col::Cid,
            schema::SENSITIVE_DATA => Col::Sensitive,
            schema::LOGIN_COUNT => Col::Login,
            schema::PURCHASE_AMOUNT => Col::Amount,
            schema::LAST_VISIT_DATE => Col::Date,
            schema::CONVERTED => Col::Converted,
            _ => return None,
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            Col::Tenant => schema::TENANT_ID,
            Col::Cid => schema::CUSTOMER_ID,
            Col::Sensitive => schema::SENSITIVE_DATA,
            Col::Login => schema::LOGIN_COUNT,
            Col::Amount => schema::PURCHASE_AMOUNT,
            Col::Date => schema::LAST_VISIT_DATE,
            Col::Converted => schema::CONVERTED,
        }
    }
    /// The Open Inference Protocol datatype of the column.
    pub fn oip_datatype(self) -> &'static str {
        match self {
            Col::Cid | Col::Login => "INT64",
            Col::Amount => "FP64",
            Col::Converted => "BOOL",
            _ => "BYTES",
        }
    }
}

/// The list of columns, for messages.
pub fn expected_columns() -> String {
    "Customer_ID, Login_Count, Purchase_Amount, Last_Visit_Date (and optionally Tenant_ID, Sensitive_Data, Converted)".to_string()
}

/// One JSON value, borrowed from the body where possible.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell<'a> {
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(Cow<'a, str>),
    Bool(bool),
    Null,
    List(Vec<Cell<'a>>),
    Map,
}

impl<'de: 'a, 'a> Deserialize<'de> for Cell<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Cell<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_i64<E>(self, v: i64) -> Result<Cell<'a>, E> {
                Ok(Cell::Int(v))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Cell<'a>, E> {
                Ok(if v <= i64::MAX as u64 { Cell::Int(v as i64) } else { Cell::UInt(v) })
            }
            fn visit_f64<E>(self, v: f64) -> Result<Cell<'a>, E> {
                Ok(Cell::Float(v))
            }
            fn visit_bool<E>(self, v: bool) -> Result<Cell<'a>, E> {
                Ok(Cell::Bool(v))
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Cell<'a>, E> {
                Ok(Cell::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Cell<'a>, E> {
                Ok(Cell::Str(Cow::Owned(v.to_string())))
            }
            fn visit_string<E>(self, v: String) -> Result<Cell<'a>, E> {
                Ok(Cell::Str(Cow::Owned(v)))
            }
            fn visit_unit<E>(self) -> Result<Cell<'a>, E> {
                Ok(Cell::Null)
            }
            fn visit_none<E>(self) -> Result<Cell<'a>, E> {
                Ok(Cell::Null)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Cell<'a>, A::Error> {
                let mut v = Vec::with_capacity(a.size_hint().unwrap_or(0).min(1 << 16));
                while let Some(c) = a.next_element::<Cell<'a>>()? {
                    v.push(c);
                }
                Ok(Cell::List(v))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Cell<'a>, A::Error> {
                while a.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Cell::Map)
            }
        }
        take_value::<D::Error>()?;
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

/// A JSON error as a message that never quotes the body.
pub fn json_error(e: &serde_json::Error, what: &str) -> Refused {
    use serde_json::error::Category;
    let kind = match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => "not valid JSON",
        Category::Data => "valid JSON but not the expected shape",
    };
    Refused::Bad(format!("{ORIGIN}: {kind} (line {}, column {}); send {what}", e.line(), e.column()))
}

/// What the rows are checked against.
pub struct Expect<'a> {
    /// The model's tenant: `Tenant_ID`, when sent, must be it.
    pub tenant: &'a str,
    /// The model's `as_of` (days): later visit dates are refused.
    pub as_of: i32,
    pub max_rows: usize,
}

fn too_many(n: usize, max: usize) -> Refused {
    Refused::TooManyRows(format!("{ORIGIN} has {n} rows; the limit is {max} rows per request (dagrun serve --max-rows): split it"))
}

/// Check the set of columns: no unknown, none twice, the required ones present.
fn check_columns<'n>(names: impl IntoIterator<Item = &'n str>) -> Result<[Option<usize>; 7], Refused> {
    let mut idx = [None; 7];
    for (i, n) in names.into_iter().enumerate() {
        let Some(c) = Col::of(n) else {
            return Err(unknown_column(&format!("column {}", i + 1), n));
        };
        if idx[c as usize].is_some() {
            return Err(Refused::Bad(format!("{ORIGIN}: column {} appears twice; keep one", c.name())));
        }
        idx[c as usize] = Some(i);
    }
    for c in REQUIRED {
        if idx[c as usize].is_none() {
            return Err(Refused::Bad(format!("{ORIGIN}: missing column {}; expected: {}", c.name(), expected_columns())));
        }
    }
    Ok(idx)
}

/// An unknown column name, described (never shown: it may be a value), at
/// `place` (`column 2`, or the row of a `dataframe_records` object).
fn unknown_column(place: &str, n: &str) -> Refused {
    Refused::Bad(format!("{ORIGIN}: {place}: unknown column name ({}){}; expected: {}", describe_value(n), ingest::spelt_like(n), expected_columns()))
}

fn null_msg(ck: &RowChecker, row: u64, line: Option<u64>, c: Col) -> Refused {
    Refused::Bad(format!("{}: empty value (nulls are not allowed); fill in every cell", ck.at(row, line, c.name())))
}

/// Check and convert every row. `get(col, row)` is the cell of a present
/// column (None: the cell is missing, which counts as null).
fn validate<'c, 'd: 'c>(
    n: usize,
    present: [bool; 7],
    lines: Option<&[u64]>,
    ex: &Expect,
    get: impl Fn(Col, usize) -> Option<&'c Cell<'d>>,
) -> Result<Rows, Refused> {
    if n == 0 {
        return Err(Refused::Bad(format!("{ORIGIN} has no data rows; provide at least one data row")));
    }
    if n > ex.max_rows {
        return Err(too_many(n, ex.max_rows));
    }
    // No other tenant is ever named to a caller: a row of another tenant is
    // only described, whether or not that tenant exists here (the answer
    // must not tell a caller which tenants a server holds).
    let opts = IngestOptions::for_scoring(ex.tenant, ex.as_of, None);
    let mut ck = RowChecker::new(ORIGIN, &opts);
    ck.reserve(n);
    let mut rows = Rows { ids: Vec::with_capacity(n), logins: Vec::with_capacity(n), amounts: Vec::with_capacity(n), dates: Vec::with_capacity(n) };
    for r in 0..n {
        let row = r as u64 + 1;
        let line = lines.map(|l| l[r]);
        let at = |c: Col| ck.at(row, line, c.name());
        let cell = |c: Col| -> Result<Option<&'c Cell<'d>>, Refused> {
            if !present[c as usize] {
                return Ok(None);
            }
            match get(c, r) {
                None | Some(Cell::Null) => Err(null_msg(&ck, row, line, c)),
                Some(Cell::Str(s)) if s.is_empty() => Err(null_msg(&ck, row, line, c)),
                Some(x) => Ok(Some(x)),
            }
        };
        let cid = match cell(Col::Cid)?.expect("required") {
            Cell::Int(v) => *v,
            Cell::Str(s) => ingest::parse_customer_id(s, || at(Col::Cid))?,
            _ => return Err(Refused::Bad(format!("{}: not an integer (int64); write the customer id as a whole number", at(Col::Cid)))),
        };
        let login = match cell(Col::Login)?.expect("required") {
            Cell::Int(v) => *v,
            Cell::UInt(_) => {
                return Err(Refused::Bad(format!(
                    "{}: value above the bound {max}; Login_Count must be <= {max}",
                    at(Col::Login),
                    max = ingest::MAX_LOGIN_COUNT
                )));
            }
            Cell::Str(s) => ingest::parse_login_count(s, || at(Col::Login))?,
            _ => return Err(Refused::Bad(format!("{}: not an integer; write Login_Count as a whole number >= 0", at(Col::Login)))),
        };
        let amount = match cell(Col::Amount)?.expect("required") {
            Cell::Int(v) => *v as f64,
            Cell::UInt(v) => *v as f64,
            Cell::Float(v) => *v,
            Cell::Str(s) => ingest::parse_purchase_amount(s, || at(Col::Amount))?,
            _ => return Err(Refused::Bad(format!("{}: not a number; write Purchase_Amount as a decimal number such as 12.50", at(Col::Amount)))),
        };
        let date = match cell(Col::Date)?.expect("required") {
            Cell::Str(s) => ingest::parse_visit_date(s, || at(Col::Date))?,
            _ => return Err(Refused::Bad(format!("{}: not a date in YYYY-MM-DD form; write dates as YYYY-MM-DD", at(Col::Date)))),
        };
        let tenant: &str = match cell(Col::Tenant)? {
            None => ex.tenant,
            Some(Cell::Str(s)) => s,
            Some(_) => return Err(Refused::Bad(format!("{}: not a string; write the tenant id as text", at(Col::Tenant)))),
        };
        let sensitive: Option<&str> = match cell(Col::Sensitive)? {
            None => None,
            Some(Cell::Str(s)) => Some(s),
            Some(_) => return Err(Refused::Bad(format!("{}: not a string", at(Col::Sensitive)))),
        };
        match cell(Col::Converted)? {
            None | Some(Cell::Bool(_)) | Some(Cell::Int(0 | 1)) => {}
            Some(Cell::Str(s)) if matches!(s.to_ascii_lowercase().as_str(), "true" | "false" | "1" | "0") => {}
            Some(_) => return Err(Refused::Bad(format!("{}: not a boolean; write true/false or 1/0", at(Col::Converted)))),
        }
        ck.row(row, line, tenant, cid, sensitive, login, amount, date)?;
        rows.ids.push(cid);
        rows.logins.push(login);
        rows.amounts.push(amount);
        rows.dates.push(date);
    }
    Ok(rows)
}

// ------------------------------------------------------------ Open Inference Protocol

/// One input tensor of an OIP inference request.
#[derive(Deserialize)]
pub struct OipInput<'a> {
    #[serde(borrow)]
    pub name: Cow<'a, str>,
    #[serde(deserialize_with = "counted")]
    pub shape: Vec<i64>,
    #[serde(borrow)]
    pub datatype: Cow<'a, str>,
    #[serde(borrow)]
    pub data: Vec<Cell<'a>>,
    #[serde(default)]
    pub parameters: Option<IgnoredAny>,
}

/// An OIP (KServe V2) inference request.
#[derive(Deserialize)]
pub struct OipRequest<'a> {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(borrow, deserialize_with = "counted_inputs")]
    pub inputs: Vec<OipInput<'a>>,
    #[serde(default)]
    pub parameters: Option<IgnoredAny>,
    #[serde(default)]
    pub outputs: Option<IgnoredAny>,
}

/// Parse an OIP inference request body (the `id` is returned even when the
/// rows are refused, so that the error can echo it).
pub fn parse_oip(body: &[u8], max_rows: usize) -> Result<OipRequest<'_>, Refused> {
    parse_within(body, max_rows, "an inference request {\"inputs\": [{\"name\", \"shape\", \"datatype\", \"data\"}, …]}")
}

/// The datatypes of the Open Inference Protocol (a datatype outside them is
/// described in a message, never shown).
const OIP_DATATYPES: [&str; 13] = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES"];

/// Whether `c` may be a value of a tensor of datatype `dt` (nulls are
/// reported by the row checks, with their row).
fn of_datatype(c: &Cell, dt: &str) -> bool {
    matches!(
        (c, dt),
        (Cell::Null, _)
            | (Cell::Int(_) | Cell::UInt(_), "INT64" | "INT32")
            | (Cell::Int(_) | Cell::UInt(_) | Cell::Float(_), "FP64" | "FP32")
            | (Cell::Str(_), "BYTES")
            | (Cell::Bool(_) | Cell::Int(0 | 1), "BOOL")
    )
}

/// The values of a tensor of `shape`, one per row: `[rows]` holds values;
/// `[rows, 1]` values, or lists of one value each (`[[a], [b]]`). None for
/// any other shape or nesting.
fn tensor_values<'a>(data: &'a [Cell<'a>], shape: &[i64]) -> Option<Vec<&'a Cell<'a>>> {
    let rows = match shape {
        [k] | [k, 1] => usize::try_from(*k).ok()?,
        _ => return None,
    };
    let nested = shape.len() == 2;
    let values: Vec<&Cell> = data
        .iter()
        .map(|c| match c {
            Cell::List(v) if nested && v.len() == 1 && !matches!(v[0], Cell::List(_)) => Some(&v[0]),
            Cell::List(_) => None,
            c => Some(c),
        })
        .collect::<Option<_>>()?;
    (values.len() == rows).then_some(values)
}

/// The rows of an OIP request.
pub fn oip_rows<'a>(req: &'a OipRequest<'a>, ex: &Expect) -> Result<Rows, Refused> {
    let idx = check_columns(req.inputs.iter().map(|i| i.name.as_ref()))?;
    let mut cols: [Vec<&'a Cell<'a>>; 7] = Default::default();
    let mut n: Option<usize> = None;
    for c in ALL {
        let Some(i) = idx[c as usize] else { continue };
        let input = &req.inputs[i];
        let dt = input.datatype.as_ref();
        if dt != c.oip_datatype() && !(c == Col::Amount && matches!(dt, "FP32" | "INT64" | "INT32")) {
            let shown = if OIP_DATATYPES.contains(&dt) { dt.to_string() } else { format!("({})", describe_value(dt)) };
            return Err(Refused::Bad(format!("{ORIGIN}: input {} has datatype {shown} but {} is expected", c.name(), c.oip_datatype())));
        }
        let Some(values) = tensor_values(&input.data, &input.shape) else {
            return Err(Refused::Bad(format!(
                "{ORIGIN}: input {} has shape {:?} but {} values nested otherwise; the shape must be [rows] (or [rows, 1]) and the data one value per row",
                c.name(),
                input.shape,
                input.data.len()
            )));
        };
        if let Some(r) = values.iter().position(|v| !of_datatype(v, dt)) {
            return Err(Refused::Bad(format!(
                "{ORIGIN}: row {}, column {}: not a value of datatype {dt}; send the values as the tensor's datatype says",
                r + 1,
                c.name()
            )));
        }
        let len = values.len();
        cols[c as usize] = values;
        match n {
            None => n = Some(len),
            Some(m) if m != len => {
                return Err(Refused::Bad(format!(
                    "{ORIGIN}: input {} has {len} rows but the other inputs have {m}; send one value per row in every input",
                    c.name()
                )));
            }
            _ => {}
        }
    }
    let mut present = [false; 7];
    for c in ALL {
        present[c as usize] = idx[c as usize].is_some();
    }
    validate(n.unwrap_or(0), present, None, ex, |c, r| cols[c as usize].get(r).copied())
}

// ------------------------------------------------------------ MLflow

/// `dataframe_split`: columns, row-major data, an ignored index.
#[derive(Deserialize)]
pub struct Split<'a> {
    #[serde(deserialize_with = "counted")]
    pub columns: Vec<Cow<'a, str>>,
    #[serde(borrow)]
    pub data: FlatRows<'a>,
    #[serde(default)]
    pub index: Option<IgnoredAny>,
}

/// Row-major `data` (a list of rows, each a list of cells), read into one
/// flat list of cells and the row lengths: no allocation per row.
#[derive(Debug, Default)]
pub struct FlatRows<'a> {
    pub cells: Vec<Cell<'a>>,
    pub lens: Vec<u32>,
}

impl<'de: 'a, 'a> Deserialize<'de> for FlatRows<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::DeserializeSeed;
        /// One row: its cells are appended to `cells`.
        struct Row<'s, 'a>(&'s mut Vec<Cell<'a>>);
        impl<'de: 'a, 'a> DeserializeSeed<'de> for Row<'_, 'a> {
            type Value = u32;
            fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<u32, D::Error> {
                d.deserialize_seq(self)
            }
        }
        impl<'de: 'a, 'a> Visitor<'de> for Row<'_, 'a> {
            type Value = u32;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a row: a list of values")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<u32, A::Error> {
                take_value::<A::Error>()?;
                let mut n = 0u32;
                while let Some(c) = a.next_element::<Cell<'a>>()? {
                    self.0.push(c);
                    n = n.saturating_add(1);
                }
                Ok(n)
            }
        }
        struct Rows<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for Rows<'a> {
            type Value = FlatRows<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of rows")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<FlatRows<'a>, A::Error> {
                let mut out = FlatRows::default();
                let guess = a.size_hint().unwrap_or(0).min(1 << 16);
                out.lens.reserve(guess);
                while let Some(n) = a.next_element_seed(Row(&mut out.cells))? {
                    if out.lens.is_empty() {
                        // Room for the rest, guessed from the first row.
                        out.cells.reserve((n as usize).saturating_mul(64).min(1 << 16));
                    }
                    out.lens.push(n);
                }
                Ok(out)
            }
        }
        d.deserialize_seq(Rows(std::marker::PhantomData))
    }
}

/// One `dataframe_records` row: cells by column, and the first unknown name.
pub struct Record<'a> {
    cells: [Option<Cell<'a>>; 7],
    unknown: Option<String>,
    twice: Option<Col>,
}

impl<'de: 'a, 'a> Deserialize<'de> for Record<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Record<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object of column: value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Record<'a>, A::Error> {
                let mut r = Record { cells: Default::default(), unknown: None, twice: None };
                take_values::<A::Error>(RECORD_COST)?;
                while let Some(k) = a.next_key::<Cow<'de, str>>()? {
                    match Col::of(&k) {
                        Some(c) => {
                            let v = a.next_value::<Cell<'a>>()?;
                            if r.cells[c as usize].replace(v).is_some() {
                                r.twice.get_or_insert(c);
                            }
                        }
                        None => {
                            a.next_value::<IgnoredAny>()?;
                            if r.unknown.is_none() {
                                r.unknown = Some(k.into_owned());
                            }
                        }
                    }
                }
                Ok(r)
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

/// An MLflow scoring-server JSON request.
#[derive(Deserialize)]
pub struct MlflowRequest<'a> {
    #[serde(borrow, default)]
    pub dataframe_split: Option<Split<'a>>,
    #[serde(borrow, default)]
    pub dataframe_records: Option<Vec<Record<'a>>>,
    #[serde(default)]
    pub instances: Option<IgnoredAny>,
    #[serde(default)]
    pub inputs: Option<IgnoredAny>,
    #[serde(default)]
    pub params: Option<IgnoredAny>,
}

const MLFLOW_SHAPE: &str = "{\"dataframe_split\": {\"columns\": […], \"data\": [[…], …]}} or {\"dataframe_records\": [{…}, …]}";

/// The rows of an MLflow JSON request.
pub fn mlflow_json_rows(body: &[u8], ex: &Expect) -> Result<Rows, Refused> {
    let req: MlflowRequest = parse_within(body, ex.max_rows, MLFLOW_SHAPE)?;
    match (&req.dataframe_split, &req.dataframe_records) {
        (Some(_), Some(_)) => Err(Refused::Bad(format!("{ORIGIN}: both dataframe_split and dataframe_records; send one"))),
        (Some(s), None) => {
            let idx = check_columns(s.columns.iter().map(|c| c.as_ref()))?;
            let width = s.columns.len();
            if let Some((r, n)) = s.data.lens.iter().enumerate().find(|(_, n)| **n as usize != width) {
                return Err(Refused::Bad(format!(
                    "{ORIGIN}: row {}: has {} but there are {width} columns; give every row one value per column",
                    r + 1,
                    crate::util::count(*n as usize, "value", "values")
                )));
            }
            // Every row has `width` cells: row r starts at r * width.
            let present = idx.map(|i| i.is_some());
            validate(s.data.lens.len(), present, None, ex, |c, r| idx[c as usize].map(|i| &s.data.cells[r * width + i]))
        }
        (None, Some(recs)) => {
            let mut present = [false; 7];
            for (i, r) in recs.iter().enumerate() {
                if let Some(u) = &r.unknown {
                    return Err(unknown_column(&format!("row {}", i + 1), u));
                }
                if let Some(c) = r.twice {
                    return Err(Refused::Bad(format!("{ORIGIN}: column {} appears twice; keep one", c.name())));
                }
                for c in ALL {
                    present[c as usize] |= r.cells[c as usize].is_some();
                }
            }
            if !recs.is_empty() {
                for c in REQUIRED {
                    if !present[c as usize] {
                        return Err(Refused::Bad(format!("{ORIGIN}: missing column {}; expected: {}", c.name(), expected_columns())));
                    }
                }
            }
            validate(recs.len(), present, None, ex, |c, r| recs[r].cells[c as usize].as_ref())
        }
        (None, None) if req.instances.is_some() || req.inputs.is_some() => {
            Err(Refused::Bad(format!("{ORIGIN}: tensor input (instances / inputs) is not accepted by this model; send {MLFLOW_SHAPE}")))
        }
        (None, None) => Err(Refused::Bad(format!("{ORIGIN}: no dataframe_split or dataframe_records; send {MLFLOW_SHAPE}"))),
    }
}

/// The rows of a CSV body (a header line naming the columns, as `predict` reads).
pub fn csv_rows(body: &[u8], ex: &Expect) -> Result<Rows, Refused> {
    let mut rdr = csv::ReaderBuilder::new().has_headers(true).flexible(true).from_reader(body);
    let shift = crate::data::ingest::crlf_line_shift(&body[..body.len().min(64 << 10)]);
    let header = rdr.headers().map_err(|e| csv_refusal(&e, None))?.clone();
    if header.is_empty() || (header.len() == 1 && header[0].is_empty()) {
        return Err(Refused::Bad(format!("{ORIGIN} is empty (no header line); send a header line naming the columns and at least one data row")));
    }
    let names: Vec<&str> = header.iter().enumerate().map(|(i, h)| if i == 0 { h.strip_prefix('\u{feff}').unwrap_or(h) } else { h }).collect();
    let idx = check_columns(names.iter().copied())?;
    let width = names.len();
    let mut records = Vec::new();
    let mut lines = Vec::new();
    let mut rec = csv::StringRecord::new();
    loop {
        let row = records.len() as u64 + 1;
        match rdr.read_record(&mut rec) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => return Err(csv_refusal(&e, Some((row, shift)))),
        }
        let line = rec.position().map(|p| p.line() + shift).unwrap_or(0);
        if rec.len() != width {
            return Err(Refused::Bad(format!(
                "{ORIGIN}: row {row} (line {line}): has {} but the header has {width}; quote fields that contain commas, and give every row one value per column",
                crate::util::count(rec.len(), "field", "fields")
            )));
        }
        if records.len() >= ex.max_rows {
            return Err(too_many(records.len() + 1, ex.max_rows));
        }
        records.push(rec.clone());
        lines.push(line);
    }
    let cells: Vec<Vec<Cell>> = records.iter().map(|r| r.iter().map(|f| Cell::Str(Cow::Borrowed(f))).collect()).collect();
    let present = idx.map(|i| i.is_some());
    validate(cells.len(), present, Some(&lines), ex, |c, r| idx[c as usize].map(|i| &cells[r][i]))
}

/// `row`: the data row and its line shift (`data::ingest::crlf_line_shift`), `None` for the header.
fn csv_refusal(e: &csv::Error, row: Option<(u64, u64)>) -> Refused {
    let shift = row.map_or(0, |(_, s)| s);
    let line = e.position().map(|p| format!(" (line {})", p.line() + shift)).unwrap_or_default();
    let row = row.map(|(r, _)| format!(": row {r}")).unwrap_or_default();
    Refused::Bad(match e.kind() {
        csv::ErrorKind::Utf8 { .. } => format!("{ORIGIN}{row}{line}: not valid UTF-8; send UTF-8 text"),
        _ => format!("{ORIGIN}{row}{line}: malformed CSV; check quoting and that every row has one value per column"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex() -> Expect<'static> {
        Expect { tenant: "Tenant_A", as_of: schema::parse_date("2026-01-01").unwrap(), max_rows: 10 }
    }

    fn bad(r: Result<Rows, Refused>) -> String {
        match r {
            Err(Refused::Bad(m)) => m,
            Err(Refused::TooManyRows(m)) => format!("413 {m}"),
            Ok(r) => panic!("accepted {r:?}"),
        }
    }

    #[test]
    fn three_shapes_give_the_same_rows() {
        let oip = br#"{"id":"x","inputs":[
            {"name":"Customer_ID","shape":[2],"datatype":"INT64","data":[1,2]},
            {"name":"Login_Count","shape":[2],"datatype":"INT64","data":[3,4]},
            {"name":"Purchase_Amount","shape":[2],"datatype":"FP64","data":[10.5,0]},
            {"name":"Last_Visit_Date","shape":[2],"datatype":"BYTES","data":["2025-12-01","2025-11-30"]}]}"#;
        let req = parse_oip(oip, 10).unwrap();
        assert_eq!(req.id.as_deref(), Some("x"));
        let a = oip_rows(&req, &ex()).unwrap();
        let split = br#"{"dataframe_split":{"index":[0,1],"columns":["Customer_ID","Login_Count","Purchase_Amount","Last_Visit_Date"],"data":[[1,3,10.5,"2025-12-01"],[2,4,0,"2025-11-30"]]}}"#;
        let b = mlflow_json_rows(split, &ex()).unwrap();
        let recs = br#"{"dataframe_records":[{"Customer_ID":1,"Login_Count":3,"Purchase_Amount":10.5,"Last_Visit_Date":"2025-12-01","Tenant_ID":"Tenant_A"},{"Last_Visit_Date":"2025-11-30","Customer_ID":2,"Login_Count":4,"Purchase_Amount":0.0,"Tenant_ID":"Tenant_A"}]}"#;
        let c = mlflow_json_rows(recs, &ex()).unwrap();
        let csv =
            b"Tenant_ID,Customer_ID,Sensitive_Data,Login_Count,Purchase_Amount,Last_Visit_Date\nTenant_A,1,x,3,10.5,2025-12-01\nTenant_A,2,y,4,0,2025-11-30\n";
        let d = csv_rows(csv, &ex()).unwrap();
        assert_eq!(a, b);
        assert_eq!(a, c);
        assert_eq!(a, d);
        assert_eq!(a.dates[0], schema::parse_date("2025-12-01").unwrap());
    }

    #[test]
    fn dataframe_split_rows_of_the_wrong_width_or_shape_are_refused() {
        let cols = r#""columns":["Customer_ID","Login_Count","Purchase_Amount","Last_Visit_Date"]"#;
        let m = bad(mlflow_json_rows(format!(r#"{{"dataframe_split":{{{cols},"data":[[1,3,1,"2025-01-01"],[2,3,1]]}}}}"#).as_bytes(), &ex()));
        assert_eq!(m, "request: row 2: has 3 values but there are 4 columns; give every row one value per column");
        let m = bad(mlflow_json_rows(format!(r#"{{"dataframe_split":{{{cols},"data":[[1]]}}}}"#).as_bytes(), &ex()));
        assert_eq!(m, "request: row 1: has 1 value but there are 4 columns; give every row one value per column");
        let m = bad(csv_rows(b"Customer_ID,Login_Count,Purchase_Amount,Last_Visit_Date\n1\n", &ex()));
        assert_eq!(m, "request: row 1 (line 2): has 1 field but the header has 4; quote fields that contain commas, and give every row one value per column");
        // The data before the columns, and nested cells: same rows, same refusals.
        let a =
            mlflow_json_rows(format!(r#"{{"dataframe_split":{{"data":[[1,3,1,"2025-01-01"],[2,4,0.5,"2025-01-02"]],{cols}}}}}"#).as_bytes(), &ex()).unwrap();
        assert_eq!((a.ids.clone(), a.logins.clone(), a.amounts.clone()), (vec![1, 2], vec![3, 4], vec![1.0, 0.5]));
        let m = bad(mlflow_json_rows(format!(r#"{{"dataframe_split":{{{cols},"data":[[1,[3],1,"2025-01-01"]]}}}}"#).as_bytes(), &ex()));
        assert!(m.contains("row 1, column Login_Count: not an integer"), "{m}");
        for shape in [r#"[1,3,1,"2025-01-01"]"#, r#"[{"a":1}]"#, r#""x""#] {
            let m = bad(mlflow_json_rows(format!(r#"{{"dataframe_split":{{{cols},"data":{shape}}}}}"#).as_bytes(), &ex()));
            assert!(m.starts_with("request: valid JSON but not the expected shape (line 1, column"), "{m}");
        }
        let m = bad(mlflow_json_rows(format!(r#"{{"dataframe_split":{{{cols},"data":[]}}}}"#).as_bytes(), &ex()));
        assert!(m.contains("no data rows"), "{m}");
    }

    #[test]
    fn refusals_name_row_and_column_and_never_echo_values() {
        let m = bad(csv_rows(b"Customer_ID,Login_Count,Purchase_Amount,Last_Visit_Date\n1,3,1,2025-01-01\n2,-4,1,2025-01-01\n", &ex()));
        assert_eq!(m, "request: row 2 (line 3), column Login_Count: negative value; Login_Count must be >= 0");
        let m =
            bad(mlflow_json_rows(br#"{"dataframe_records":[{"Customer_ID":1,"Login_Count":3,"Purchase_Amount":1,"Last_Visit_Date":"2027-01-01"}]}"#, &ex()));
        assert!(m.starts_with("request: row 1, column Last_Visit_Date: date in the future relative to as_of (2026-01-01)"), "{m}");
        let m = bad(mlflow_json_rows(
            br#"{"dataframe_records":[{"Customer_ID":1,"Login_Count":3,"Purchase_Amount":1,"Last_Visit_Date":"2025-01-01","Tenant_ID":"Tenant_B"}]}"#,
            &ex(),
        ));
        assert!(m.contains("row 1, column Tenant_ID: row belongs to tenant (8 characters, text)"), "{m}");
        let m = bad(mlflow_json_rows(
            br#"{"dataframe_records":[{"Customer_ID":1,"Login_Count":3,"Purchase_Amount":1,"Last_Visit_Date":"2025-01-01","secret-alice@example.com":1}]}"#,
            &ex(),
        ));
        assert!(m.starts_with("request: row 1: unknown column name (24 characters, looks like an e-mail address)") && !m.contains("alice"), "{m}");
        let m = bad(mlflow_json_rows(br#"{"dataframe_split":{"columns":["Customer_ID","login count","Purchase_Amount","Last_Visit_Date"],"data":[]}}"#, &ex()));
        assert!(m.starts_with("request: column 2: unknown column name (11 characters, text with spaces) (is it Login_Count spelt differently?"), "{m}");
        let m = bad(mlflow_json_rows(br#"{"dataframe_split":{"columns":["Customer_ID","Login_Count","Purchase_Amount","Last_Visit_Date","Sensitive_Data"],"data":[[1,3,1,"alice@example.com","x"]]}}"#, &ex()));
        assert!(m.contains("column Last_Visit_Date: not a date") && !m.contains("alice"), "{m}");
        let m = bad(mlflow_json_rows(br#"{"dataframe_split":{"columns":["Customer_ID"],"data":[["alice@example.com"]]}}"#, &ex()));
        assert!(m.contains("missing column Login_Count"), "{m}");
        let m = bad(mlflow_json_rows(br#"{"dataframe_records": "alice@example.com"}"#, &ex()));
        assert!(!m.contains("alice") && m.contains("line 1"), "{m}");
        let m = bad(mlflow_json_rows(br#"{"dataframe_split":{"columns":["Customer_ID","Login_Count","Purchase_Amount","Last_Visit_Date"],"data":[[1,3,1,"2025-01-01"],[1,3,1,"2025-01-01"]]}}"#, &ex()));
        assert!(m.contains("row 2, column Customer_ID: duplicate Customer_ID: an earlier row"), "{m}");
        let m = bad(mlflow_json_rows(
            br#"{"dataframe_split":{"columns":["Customer_ID","Login_Count","Purchase_Amount","Last_Visit_Date"],"data":[[1,3,null,"2025-01-01"]]}}"#,
            &ex(),
        ));
        assert!(m.contains("row 1, column Purchase_Amount: empty value"), "{m}");
        let rows: Vec<String> = (0..11).map(|i| format!("[{i},1,1,\"2025-01-01\"]")).collect();
        let body =
            format!(r#"{{"dataframe_split":{{"columns":["Customer_ID","Login_Count","Purchase_Amount","Last_Visit_Date"],"data":[{}]}}}}"#, rows.join(","));
        assert!(bad(mlflow_json_rows(body.as_bytes(), &ex())).starts_with("413 request has 11 rows"));
        let req = parse_oip(br#"{"inputs":[{"name":"Customer_ID","shape":[1],"datatype":"FP64","data":[1]}]}"#, 10).unwrap();
        let m = bad(oip_rows(&req, &ex()));
        assert!(m.contains("missing column Login_Count"), "{m}");
    }

    /// A body of tiny values (`{}`, `[]`, `0`) is refused while it is parsed,
    /// once it holds more values than the row limit allows: never hundreds
    /// of bytes of memory per byte of body.
    #[test]
    fn parsing_stops_at_the_value_budget() {
        let many = |item: &str, n: usize| vec![item; n].join(",");
        let n = value_budget(10) + 1;
        for body in [
            format!(r#"{{"dataframe_records":[{}]}}"#, many("{}", n)),
            format!(r#"{{"dataframe_split":{{"columns":["Customer_ID"],"data":[[{}]]}}}}"#, many("0", n)),
            format!(r#"{{"dataframe_split":{{"columns":["Customer_ID"],"data":[{}]}}}}"#, many("[]", n)),
        ] {
            let m = bad(mlflow_json_rows(body.as_bytes(), &ex()));
            assert!(m.starts_with("413 request holds more values than 10 rows can"), "{m}");
        }
        assert!(
            bad(mlflow_json_rows(format!(r#"{{"dataframe_split":{{"columns":[{}],"data":[]}}}}"#, many(r#""""#, n)).as_bytes(), &ex())).starts_with("413 ")
        );
        for body in [
            format!(r#"{{"inputs":[{{"name":"Customer_ID","shape":[1],"datatype":"INT64","data":[{}]}}]}}"#, many("0", n)),
            format!(r#"{{"inputs":[{{"name":"Customer_ID","shape":[1],"datatype":"INT64","data":[{}]}}]}}"#, many("[]", n)),
            format!(r#"{{"inputs":[{{"name":"Customer_ID","shape":[{}],"datatype":"INT64","data":[]}}]}}"#, many("0", n)),
            format!(r#"{{"inputs":[{}]}}"#, many(r#"{"name":"","shape":[],"datatype":"","data":[]}"#, n / INPUT_COST + 1)),
        ] {
            assert!(matches!(parse_oip(body.as_bytes(), 10), Err(Refused::TooManyRows(_))));
        }
        // max_rows rows with every column, in either shape, fit.
        let full = r#"{"Tenant_ID":"Tenant_A","Customer_ID":1,"Sensitive_Data":"x","Login_Count":3,"Purchase_Amount":1,"Last_Visit_Date":"2025-01-01","Converted":true}"#;
        let recs: Vec<String> = (0..10).map(|i| full.replace("\"Customer_ID\":1", &format!("\"Customer_ID\":{i}"))).collect();
        assert_eq!(mlflow_json_rows(format!(r#"{{"dataframe_records":[{}]}}"#, recs.join(",")).as_bytes(), &ex()).unwrap().len(), 10);
        let row = r#"["Tenant_A",ID,"x",3,1,"2025-01-01",true]"#;
        let rows: Vec<String> = (0..10).map(|i| row.replace("ID", &i.to_string())).collect();
        let split = format!(
            r#"{{"dataframe_split":{{"columns":["Tenant_ID","Customer_ID","Sensitive_Data","Login_Count","Purchase_Amount","Last_Visit_Date","Converted"],"data":[{}]}}}}"#,
            rows.join(",")
        );
        assert_eq!(mlflow_json_rows(split.as_bytes(), &ex()).unwrap().len(), 10);
        let tensor = |name: &str, dt: &str, v: &str| format!(r#"{{"name":"{name}","shape":[10,1],"datatype":"{dt}","data":[{}]}}"#, [v; 10].join(","));
        let oip = format!(
            r#"{{"inputs":[{}]}}"#,
            [
                tensor("Tenant_ID", "BYTES", r#""Tenant_A""#),
                tensor("Customer_ID", "INT64", "1"),
                tensor("Sensitive_Data", "BYTES", r#""x""#),
                tensor("Login_Count", "INT64", "3"),
                tensor("Purchase_Amount", "FP64", "1.5"),
                tensor("Last_Visit_Date", "BYTES", r#""2025-01-01""#),
                tensor("Converted", "BOOL", "true"),
            ]
            .join(",")
        );
        for max_rows in [10, 1] {
            let budget_left = |b: &str| parse_oip(b.as_bytes(), max_rows).is_ok();
            assert_eq!(budget_left(&oip), max_rows == 10, "max_rows {max_rows}");
        }
        // Within it, a parse is as before; the budget ends with the parse.
        let rows =
            format!(r#"{{"dataframe_records":[{}]}}"#, many(r#"{"Customer_ID":1,"Login_Count":3,"Purchase_Amount":1,"Last_Visit_Date":"2025-01-01"}"#, 1));
        assert_eq!(mlflow_json_rows(rows.as_bytes(), &ex()).unwrap().len(), 1);
        assert_eq!(VALUES_LEFT.get(), usize::MAX);
    }

    /// An OIP tensor's values are of its datatype and nested only as its shape says.
    #[test]
    fn oip_values_follow_datatype_and_shape() {
        let req = |cid: &str, shape: &str, dt: &str| {
            format!(
                r#"{{"inputs":[{{"name":"Customer_ID","shape":{shape},"datatype":"{dt}","data":{cid}}},
                {{"name":"Login_Count","shape":[1],"datatype":"INT64","data":[3]}},
                {{"name":"Purchase_Amount","shape":[1],"datatype":"INT32","data":[1]}},
                {{"name":"Last_Visit_Date","shape":[1],"datatype":"BYTES","data":["2025-01-01"]}}]}}"#
            )
        };
        let rows = |body: String| oip_rows(&parse_oip(body.as_bytes(), 10).unwrap(), &ex());
        assert_eq!(rows(req("[7]", "[1]", "INT64")).unwrap().ids, vec![7]);
        assert_eq!(rows(req("[[7]]", "[1, 1]", "INT64")).unwrap().ids, vec![7]);
        assert_eq!(rows(req("[7]", "[1, 1]", "INT64")).unwrap().ids, vec![7]);
        for (cid, shape) in [("[[[[7]]]]", "[1]"), ("[[7]]", "[1]"), ("[[[7]]]", "[1, 1]"), ("[[7, 8]]", "[1, 1]"), ("[7]", "[1, 2]")] {
            let m = bad(rows(req(cid, shape, "INT64")));
            assert!(m.contains("input Customer_ID has shape") && m.contains("one value per row"), "{cid} {shape}: {m}");
        }
        let m = bad(rows(req(r#"["12"]"#, "[1]", "INT64")));
        assert!(m.starts_with("request: row 1, column Customer_ID: not a value of datatype INT64"), "{m}");
        let m = bad(rows(req("[7]", "[1]", "alice@example.com")));
        assert!(m.contains("has datatype (17 characters, looks like an e-mail address) but INT64"), "{m}");
        let m = bad(rows(req("[7]", "[1]", "FP64")));
        assert!(m.contains("has datatype FP64 but INT64"), "{m}");
        let fractional = req("[7]", "[1]", "INT64").replace(r#""datatype":"INT32","data":[1]"#, r#""datatype":"INT32","data":[1.75]"#);
        let m = bad(rows(fractional));
        assert!(m.starts_with("request: row 1, column Purchase_Amount: not a value of datatype INT32"), "{m}");
    }
}
