//! Parquet input: batches read with the column types of spec §2 (int64,
//! float64, date32 or a `YYYY-MM-DD` string; compatible narrower types are
//! widened), a decoder panic on a corrupt file turned into an error.
//!
//! Rules: an error names the file, the row group's data row and the column;
//! a wrong type names the type wanted.
//!
//! A Parquet file is compressed, so its size says little about what it
//! expands to; a small file must not become gigabytes of memory or of
//! plaintext on disk. So:
//! - its schema may nest at most [`MAX_SCHEMA_DEPTH`] levels, checked on the
//!   footer's bytes before the decoder builds the schema tree (which recurses
//!   once per level: a 24 KB footer nested 3,000 deep overflowed the stack);
//! - it may declare at most [`MAX_ROWS_PER_BYTE`] rows per byte of file
//!   (above a floor of [`ROWS_FLOOR`]): dictionary and run-length encoding let
//!   a few bytes stand for millions of rows. The row groups' counts (what the
//!   decoder reads) must add up to the file's count (what the cap checks);
//! - string columns are read as views (`Utf8View`): a dictionary-encoded
//!   value is not copied once per row, and every value's length is checked
//!   ([`MAX_SENSITIVE_BYTES`], the tenant id's 64, a date's 64) before any
//!   is expanded, so one 30 KB dictionary value repeated 200,000 times is an
//!   error at its first row, not 6 GB.

use super::*;

/// Deepest schema a file may have (the spec's is flat: the root and its columns).
pub const MAX_SCHEMA_DEPTH: usize = 8;
/// Most rows a file may declare per byte of its size (above [`ROWS_FLOOR`]).
pub const MAX_ROWS_PER_BYTE: u64 = 16;
/// Rows any file may declare whatever its size.
pub const ROWS_FLOOR: u64 = 1_000_000;
/// Longest value of a string column other than `Sensitive_Data` (a tenant id
/// is at most 64 characters, a date 10).
const MAX_OTHER_STRING_BYTES: usize = 64;

pub(super) struct ParquetSource {
    pub(super) reader: ParquetRecordBatchReader,
    /// Column index in the file of each raw_schema(true) column.
    pub(super) idx: [Option<usize>; 7],
    pub(super) row: u64,
}

pub(super) fn type_ok(col: &str, dt: &DataType) -> bool {
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

pub(super) fn wanted_type(col: &str) -> &'static str {
    match col {
        TENANT_ID | SENSITIVE_DATA => "utf8 (string)",
        CUSTOMER_ID | LOGIN_COUNT => "int64 (or a smaller integer type)",
        PURCHASE_AMOUNT => "float64 (or float32 / an integer type)",
        LAST_VISIT_DATE => "date32 (or date64, a midnight timestamp, or YYYY-MM-DD strings)",
        _ => "bool",
    }
}

impl ParquetSource {
    pub(super) fn open(path: &Path, opts: &IngestOptions, batch_size: usize) -> Result<(Self, bool)> {
        let fname = path.display().to_string();
        let file = open_input(path)?;
        if file.metadata().map(|m| m.len() == 0).unwrap_or(false) {
            bail!("{fname} is empty (0 bytes); provide a Parquet file with at least one data row");
        }
        // Types are taken from the Parquet schema itself (not the embedded
        // Arrow schema), which normalises large/view/dictionary string variants.
        let file_len = file.metadata().map(|m| m.len()).unwrap_or(u64::MAX);
        super::footer::check_schema_depth(&file, file_len, MAX_SCHEMA_DEPTH).map_err(|why| anyhow!("{fname}: {why}"))?;
        let again = file.try_clone().with_context(|| format!("cannot open {fname}"))?;
        let opened =
            catch_decoder_panic(|| ParquetRecordBatchReaderBuilder::try_new_with_options(file, ArrowReaderOptions::new().with_skip_arrow_metadata(true)))
                .map_err(|_| anyhow!("{fname} is not a readable Parquet file (corrupt footer); write it with a Parquet writer such as pyarrow"))?;
        let b = opened.map_err(|e| anyhow!("{fname} is not a readable Parquet file ({e}); write it with a Parquet writer such as pyarrow"))?;
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
        let declared = b.metadata().file_metadata().num_rows();
        if declared <= 0 {
            bail!("{fname} has no data rows; provide a file with at least one data row");
        }
        // The decoder reads as many rows as each row group says: their sum
        // must be the file's count, which the cap below then bounds.
        let groups = b.metadata().row_groups().iter().try_fold(0i64, |sum, g| (g.num_rows() >= 0).then(|| sum.checked_add(g.num_rows())).flatten());
        if groups != Some(declared) {
            bail!(
                "{fname}: corrupt Parquet metadata: its row groups hold {} rows but the file says {declared}; rewrite the file with a Parquet writer such as pyarrow",
                groups.map_or("an impossible number of".to_string(), |g| g.to_string())
            );
        }
        let allowed = file_len.saturating_mul(MAX_ROWS_PER_BYTE).max(ROWS_FLOOR);
        if declared as u64 > allowed {
            bail!(
                "{fname} declares {declared} rows in {file_len} bytes, more than {MAX_ROWS_PER_BYTE} rows per byte (at most {allowed} here): real customer data does not compress that far; refused as a decompression bomb. Split the file, or write it without run-length tricks"
            );
        }
        // The same reader, with the string columns read as views (see the module's rules).
        let hinted: Vec<arrow_schema::Field> = schema
            .fields()
            .iter()
            .map(|f| match (f.name().as_str(), f.data_type()) {
                (TENANT_ID | SENSITIVE_DATA | LAST_VISIT_DATE, DataType::Utf8 | DataType::LargeUtf8) => f.as_ref().clone().with_data_type(DataType::Utf8View),
                _ => f.as_ref().clone(),
            })
            .collect();
        let options = ArrowReaderOptions::new().with_skip_arrow_metadata(true).with_schema(Arc::new(arrow_schema::Schema::new(hinted)));
        let meta = parquet::arrow::arrow_reader::ArrowReaderMetadata::try_new(b.metadata().clone(), options)
            .map_err(|e| anyhow!("{fname} is not a readable Parquet file ({e})"))?;
        let reader = ParquetRecordBatchReaderBuilder::new_with_metadata(again, meta)
            .with_batch_size(batch_size)
            .build()
            .map_err(|e| anyhow!("{fname} is not a readable Parquet file ({e})"))?;
        Ok((ParquetSource { reader, idx, row: 0 }, has_label))
    }

    pub(super) fn next_batch(&mut self, ck: &mut Checker, schema: &SchemaRef) -> Result<Option<RecordBatch>> {
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
        // Lengths first: nothing is expanded before every value is known to be short.
        for (k, max, what) in [
            (0, MAX_OTHER_STRING_BYTES, "a tenant id is at most 64 characters"),
            (2, MAX_SENSITIVE_BYTES, "Sensitive_Data is an e-mail-like value"),
            (5, MAX_OTHER_STRING_BYTES, "a date is YYYY-MM-DD"),
        ] {
            if let Some((i, len)) = too_long(col(k)?, max) {
                bail!("{}: a value of {len} bytes; at most {max} bytes are allowed here ({what})", at(i, k));
            }
        }
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
        let mut cols: Vec<ArrayRef> = vec![Arc::new(tenant), Arc::new(cid), Arc::new(sens), Arc::new(login), Arc::new(amt), Arc::new(date)];
        if let Some(l) = label {
            cols.push(Arc::new(l));
        }
        Ok(Some(RecordBatch::try_new(schema.clone(), cols)?))
    }
}

/// Run the Parquet decoder on a user's file, turning a panic of the decoder on
/// corrupt input into an `Err` *without* printing it: the panic hook (wrapped
/// once, delegating to the previous hook everywhere else) stays silent while
/// this thread is inside the decoder, so the user sees one clear error, not a
/// backtrace. The caller words the error.
pub(super) fn catch_decoder_panic<R>(f: impl FnOnce() -> R) -> std::thread::Result<R> {
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

/// The first value of a string column longer than `max` bytes, and its
/// length (None for other types; a view's length is read without its bytes).
fn too_long(a: &ArrayRef, max: usize) -> Option<(usize, usize)> {
    let first = |lens: &mut dyn Iterator<Item = usize>| lens.enumerate().find(|&(_, n)| n > max);
    match a.data_type() {
        DataType::Utf8View => first(&mut a.as_string_view().views().iter().map(|v| *v as u32 as usize)),
        DataType::Utf8 => first(&mut a.as_string::<i32>().offsets().windows(2).map(|w| (w[1] - w[0]) as usize)),
        DataType::LargeUtf8 => first(&mut a.as_string::<i64>().offsets().windows(2).map(|w| (w[1] - w[0]) as usize)),
        _ => None,
    }
}

pub(super) fn to_utf8(a: &ArrayRef) -> StringArray {
    match a.data_type() {
        DataType::Utf8 => a.as_string::<i32>().clone(),
        DataType::LargeUtf8 => StringArray::from_iter_values(a.as_string::<i64>().iter().map(|v| v.unwrap_or(""))),
        _ => StringArray::from_iter_values(a.as_string_view().iter().map(|v| v.unwrap_or(""))),
    }
}

pub(super) fn to_i64(a: &ArrayRef, at: impl Fn(usize) -> String) -> Result<Int64Array> {
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

pub(super) fn to_f64(a: &ArrayRef) -> Float64Array {
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

pub(super) fn to_date32(a: &ArrayRef, at: impl Fn(usize) -> String) -> Result<Date32Array> {
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
