//! Arrow schemas of the three datasets (spec §2–§4) and date helpers.
//!
//! Every column is non-nullable. `Converted` is non-nullable too: a dataset
//! either carries the label for every row or omits the column entirely
//! (prediction-time data); there is no "unknown label" row.

use anyhow::{Result, bail};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use std::sync::Arc;

pub const TENANT_ID: &str = "Tenant_ID";
pub const CUSTOMER_ID: &str = "Customer_ID";
pub const SENSITIVE_DATA: &str = "Sensitive_Data";
pub const SENSITIVE_DATA_ENC: &str = "Sensitive_Data_Enc";
pub const SENSITIVE_TOKEN: &str = "Sensitive_Token";
pub const LOGIN_COUNT: &str = "Login_Count";
pub const PURCHASE_AMOUNT: &str = "Purchase_Amount";
pub const LAST_VISIT_DATE: &str = "Last_Visit_Date";
pub const CONVERTED: &str = "Converted";

/// Byte width of `Sensitive_Token` (HMAC-SHA256).
pub const TOKEN_LEN: i32 = 32;

fn f(name: &str, dt: DataType) -> Field {
    Field::new(name, dt, false)
}

/// Raw data (spec §2): Tenant_ID utf8, Customer_ID int64, Sensitive_Data utf8,
/// Login_Count int64, Purchase_Amount float64, Last_Visit_Date date32, [Converted bool].
pub fn raw_schema(with_label: bool) -> SchemaRef {
    let mut v = vec![
        f(TENANT_ID, DataType::Utf8),
        f(CUSTOMER_ID, DataType::Int64),
        f(SENSITIVE_DATA, DataType::Utf8),
        f(LOGIN_COUNT, DataType::Int64),
        f(PURCHASE_AMOUNT, DataType::Float64),
        f(LAST_VISIT_DATE, DataType::Date32),
    ];
    if with_label {
        v.push(f(CONVERTED, DataType::Boolean));
    }
    Arc::new(Schema::new(v))
}

/// Encrypted data (spec §3): `Sensitive_Data` replaced by `Sensitive_Data_Enc`
/// (binary nonce||ciphertext||tag) and `Sensitive_Token` (fixed_size_binary(32)).
pub fn encrypted_schema(with_label: bool) -> SchemaRef {
    let mut v = vec![
        f(TENANT_ID, DataType::Utf8),
        f(CUSTOMER_ID, DataType::Int64),
        f(SENSITIVE_DATA_ENC, DataType::Binary),
        f(SENSITIVE_TOKEN, DataType::FixedSizeBinary(TOKEN_LEN)),
        f(LOGIN_COUNT, DataType::Int64),
        f(PURCHASE_AMOUNT, DataType::Float64),
        f(LAST_VISIT_DATE, DataType::Date32),
    ];
    if with_label {
        v.push(f(CONVERTED, DataType::Boolean));
    }
    Arc::new(Schema::new(v))
}

/// Feature rows (spec §4, feature set v1.0).
pub fn features_schema(with_label: bool) -> SchemaRef {
    let mut v = vec![
        f(TENANT_ID, DataType::Utf8),
        f(CUSTOMER_ID, DataType::Int64),
        f(SENSITIVE_TOKEN, DataType::FixedSizeBinary(TOKEN_LEN)),
        f("Recency_Days", DataType::Int64),
        f("Frequency_Ratio", DataType::Float64),
        f("High_Value_Segment", DataType::Int64),
        f("Purchase_Login_Ratio", DataType::Float64),
        f("Activity_Score", DataType::Float64),
    ];
    if with_label {
        v.push(f(CONVERTED, DataType::Boolean));
    }
    Arc::new(Schema::new(v))
}

/// Days from 0001-01-01 (CE day 1) to 1970-01-01.
const UNIX_EPOCH_CE_DAYS: i32 = 719_163;

/// Parse a strict `YYYY-MM-DD` date into days since 1970-01-01 (Arrow date32).
/// Dates before 1970 are returned as negative numbers; callers decide whether
/// they are acceptable. The error message never repeats the input.
pub fn parse_date(s: &str) -> Result<i32> {
    let b = s.as_bytes();
    let ok_shape = b.len() == 10 && b[4] == b'-' && b[7] == b'-' && b.iter().enumerate().all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit());
    if !ok_shape {
        bail!("not a date in YYYY-MM-DD form");
    }
    let num = |r: std::ops::Range<usize>| b[r].iter().fold(0u32, |a, c| a * 10 + u32::from(c - b'0'));
    let (y, m, d) = (num(0..4) as i32, num(5..7), num(8..10));
    match chrono::NaiveDate::from_ymd_opt(y, m, d) {
        Some(date) => Ok(chrono::Datelike::num_days_from_ce(&date) - UNIX_EPOCH_CE_DAYS),
        None => bail!("not a valid calendar date (YYYY-MM-DD)"),
    }
}

/// Format days since 1970-01-01 as `YYYY-MM-DD` (out-of-range values are
/// shown as `day <n>` rather than panicking).
pub fn format_date(days: i32) -> String {
    days.checked_add(UNIX_EPOCH_CE_DAYS)
        .and_then(chrono::NaiveDate::from_num_days_from_ce_opt)
        .map(|d| d.format("%Y-%m-%d").to_string())
        .unwrap_or_else(|| format!("day {days} since 1970-01-01"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_round_trip() {
        assert_eq!(parse_date("1970-01-01").unwrap(), 0);
        assert_eq!(parse_date("1970-01-02").unwrap(), 1);
        assert_eq!(parse_date("1969-12-31").unwrap(), -1);
        assert_eq!(parse_date("2026-01-01").unwrap(), 20454);
        assert_eq!(format_date(20454), "2026-01-01");
        assert_eq!(format_date(-1), "1969-12-31");
        for bad in ["", "2026-1-01", "2026-02-30", "20260101", "2026-01-01T00", "２026-01-01", "abcd-ef-gh"] {
            assert!(parse_date(bad).is_err(), "{bad}");
        }
        let _ = format_date(i32::MAX);
        let _ = format_date(i32::MIN);
    }

    #[test]
    fn schemas_exact() {
        let r = raw_schema(true);
        let names: Vec<_> = r.fields().iter().map(|f| f.name().as_str()).collect();
        assert_eq!(names, ["Tenant_ID", "Customer_ID", "Sensitive_Data", "Login_Count", "Purchase_Amount", "Last_Visit_Date", "Converted"]);
        assert_eq!(raw_schema(false).fields().len(), 6);
        assert_eq!(encrypted_schema(true).field(3).data_type(), &DataType::FixedSizeBinary(32));
        assert_eq!(features_schema(false).fields().len(), 8);
        assert!(r.fields().iter().all(|f| !f.is_nullable()));
    }
}
