//! Feature set v1.0 over files and batches (spec §4). The formulas live only
//! in `crate::features::v1`; this module streams data through them.

use crate::data::parquet_io::ParquetSink;
use crate::data::schema::*;
use crate::features::v1::{self, TenantStats};
use anyhow::{Context, Result, anyhow, bail};
use arrow_array::cast::AsArray;
use arrow_array::types::{Date32Type, Float64Type, Int64Type};
use arrow_array::{Array, ArrayRef, BooleanArray, Float64Array, Int64Array, RecordBatch};
use arrow_schema::DataType;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

/// Fit the tenant statistics over every row of a raw or encrypted Parquet
/// file (one tenant per file), reading only `Login_Count` and `Purchase_Amount`.
///
/// Memory: the login column is reduced to an exact i128 sum as it streams,
/// but the whole `Purchase_Amount` column is kept (8 bytes/row): the 0.8
/// quantile needs every value. `mean_login` is computed exactly as
/// `v1::fit` does (exact integer sum, one division), and `p80_purchase` by
/// `v1::fit` itself; a test checks the result equals `v1::fit` on the full columns.
pub fn fit_stats(path: &Path) -> Result<TenantStats> {
    let fname = path.display().to_string();
    let file = File::open(path).with_context(|| format!("cannot open {fname}"))?;
    let b = ParquetRecordBatchReaderBuilder::try_new(file).with_context(|| format!("{fname} is not a readable Parquet file"))?;
    let mask = ProjectionMask::columns(b.parquet_schema(), [LOGIN_COUNT, PURCHASE_AMOUNT]);
    let reader = b.with_projection(mask).with_batch_size(crate::data::DEFAULT_BATCH_SIZE).build()?;
    let mut login_sum: i128 = 0;
    let mut n: u64 = 0;
    let mut purchases: Vec<f64> = Vec::new();
    for batch in reader {
        let batch = batch.with_context(|| format!("cannot read Parquet file {fname}"))?;
        let l = column::<Int64Type>(&batch, LOGIN_COUNT, &fname)?;
        let p = column::<Float64Type>(&batch, PURCHASE_AMOUNT, &fname)?;
        login_sum += l.values().iter().map(|&v| v as i128).sum::<i128>();
        n += l.len() as u64;
        purchases.extend_from_slice(p.values());
    }
    let mut stats = v1::fit(&[], &mut purchases);
    stats.mean_login = if n == 0 { 0.0 } else { login_sum as f64 / n as f64 };
    stats.rows = n;
    Ok(stats)
}

fn column<'a, T: arrow_array::ArrowPrimitiveType>(batch: &'a RecordBatch, name: &str, fname: &str) -> Result<&'a arrow_array::PrimitiveArray<T>> {
    let a = batch.column_by_name(name).ok_or_else(|| anyhow!("{fname}: missing column {name}; expected a raw or encrypted dataset written by dagrun"))?;
    if a.data_type() != &T::DATA_TYPE {
        bail!("{fname}: column {name} has type {} but {} is expected", a.data_type(), T::DATA_TYPE);
    }
    if a.null_count() > 0 {
        bail!("{fname}: column {name} contains nulls; rerun the ingest stage");
    }
    Ok(a.as_primitive::<T>())
}

/// The five v1 feature columns (`FEATURE_NAMES` order) of a batch holding
/// `Login_Count`, `Purchase_Amount` and `Last_Visit_Date` (found by name;
/// `f` names the input in errors), computed on all cores.
fn feature_columns(stats: &TenantStats, as_of: i32, batch: &RecordBatch, f: &str) -> Result<[ArrayRef; 5]> {
    let login = column::<Int64Type>(batch, LOGIN_COUNT, f)?;
    let amount = column::<Float64Type>(batch, PURCHASE_AMOUNT, f)?;
    let date = column::<Date32Type>(batch, LAST_VISIT_DATE, f)?;
    let n = batch.num_rows();
    let (lv, av, dv) = (login.values(), amount.values(), date.values());
    // Rows are independent: transform contiguous chunks on all cores.
    let parts = crate::util::par::map_chunks(n, crate::util::par::threads(), 16_384, |r| {
        let m = r.len();
        let (mut rec, mut freq, mut hvs, mut plr, mut act) =
            (Vec::with_capacity(m), Vec::with_capacity(m), Vec::with_capacity(m), Vec::with_capacity(m), Vec::with_capacity(m));
        for i in r {
            let x = v1::transform(stats, as_of, lv[i], av[i], dv[i]);
            rec.push(x.recency_days);
            freq.push(x.frequency_ratio);
            hvs.push(x.high_value_segment);
            plr.push(x.purchase_login_ratio);
            act.push(x.activity_score);
        }
        (rec, freq, hvs, plr, act)
    });
    let (mut rec, mut freq, mut hvs, mut plr, mut act) =
        (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    for (a, b, c, d, e) in parts {
        rec.extend(a);
        freq.extend(b);
        hvs.extend(c);
        plr.extend(d);
        act.extend(e);
    }
    Ok([
        Arc::new(Int64Array::from(rec)),
        Arc::new(Float64Array::from(freq)),
        Arc::new(Int64Array::from(hvs)),
        Arc::new(Float64Array::from(plr)),
        Arc::new(Float64Array::from(act)),
    ])
}

/// Features of one batch in `encrypted_schema` form (columns found by name;
/// `Converted` carried over when present) → `features_schema` batch.
pub fn features_batch(stats: &TenantStats, as_of: i32, batch: &RecordBatch) -> Result<RecordBatch> {
    let f = "feature input";
    let get = |name: &str| -> Result<&ArrayRef> { batch.column_by_name(name).ok_or_else(|| anyhow!("{f}: missing column {name}")) };
    let tenant = get(TENANT_ID)?.clone();
    let cid = get(CUSTOMER_ID)?.clone();
    let token = get(SENSITIVE_TOKEN)?.clone();
    if token.data_type() != &DataType::FixedSizeBinary(TOKEN_LEN) {
        bail!("{f}: column Sensitive_Token has type {} but FixedSizeBinary(32) is expected", token.data_type());
    }
    let [rec, freq, hvs, plr, act] = feature_columns(stats, as_of, batch, f)?;
    let label = batch.column_by_name(CONVERTED).cloned();
    if let Some(l) = &label
        && l.as_any().downcast_ref::<BooleanArray>().is_none()
    {
        bail!("{f}: column Converted has type {} but Boolean is expected", l.data_type());
    }
    let mut cols: Vec<ArrayRef> = vec![tenant, cid, token, rec, freq, hvs, plr, act];
    let has_label = label.is_some();
    if let Some(l) = label {
        cols.push(l);
    }
    RecordBatch::try_new(features_schema(has_label), cols).map_err(|e| anyhow!("{f}: {e}"))
}

/// Stream an encrypted Parquet file into a features Parquet file (atomic).
/// Returns the number of rows written.
pub fn transform_file(input: &Path, output: &Path, stats: &TenantStats, as_of: i32, kv_metadata: Vec<(String, String)>) -> Result<u64> {
    let has_label = crate::data::parquet_io::read_schema(input)?.field_with_name(CONVERTED).is_ok();
    // The carried columns (tenant, id, token, label) pass through byte for
    // byte (spliced, not decoded and encoded again); only the five features
    // are computed, from the three columns they need. An input dagrun did not
    // write in this layout takes the ordinary path below.
    let spliced = crate::data::parquet_io::rewrite_with_spliced_columns(
        input,
        output,
        crate::data::parquet_io::Output { schema: features_schema(has_label), kv_metadata: kv_metadata.clone() },
        crate::data::parquet_io::SpliceColumns {
            computed: &v1::FEATURE_NAMES,
            read: &[LOGIN_COUNT, PURCHASE_AMOUNT, LAST_VISIT_DATE],
            batch_size: crate::data::DEFAULT_BATCH_SIZE,
        },
        |batch| Ok(feature_columns(stats, as_of, batch, &input.display().to_string())?.to_vec()),
    )
    .with_context(|| format!("featurizing {}", input.display()))?;
    if let Some(rows) = spliced {
        return Ok(rows);
    }
    let mut sink = ParquetSink::create(output, features_schema(has_label), kv_metadata)?;
    // Every column but the ciphertext, which features never use.
    let cols = [TENANT_ID, CUSTOMER_ID, SENSITIVE_TOKEN, LOGIN_COUNT, PURCHASE_AMOUNT, LAST_VISIT_DATE, CONVERTED];
    for b in crate::data::parquet_io::open_batches_columns(input, crate::data::DEFAULT_BATCH_SIZE, &cols)? {
        let out = features_batch(stats, as_of, &b?).with_context(|| format!("featurizing {}", input.display()))?;
        sink.write(&out)?;
    }
    let rows = sink.rows();
    sink.finish()?;
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::parquet_io::open_batches;
    use arrow_array::{BinaryArray, Date32Array, FixedSizeBinaryArray, StringArray};

    fn enc_batch() -> RecordBatch {
        let tok: Vec<[u8; 32]> = vec![[1u8; 32], [2u8; 32], [3u8; 32]];
        RecordBatch::try_new(
            encrypted_schema(true),
            vec![
                Arc::new(StringArray::from(vec!["T"; 3])),
                Arc::new(Int64Array::from(vec![0, 1, 2])),
                Arc::new(BinaryArray::from_vec(vec![b"x", b"y", b"z"])),
                Arc::new(FixedSizeBinaryArray::try_from_iter(tok.into_iter()).unwrap()),
                Arc::new(Int64Array::from(vec![20, 0, 5])),
                Arc::new(Float64Array::from(vec![150.0, 12.5, 100.0])),
                Arc::new(Date32Array::from(vec![10, 100, 55])),
                Arc::new(BooleanArray::from(vec![true, false, true])),
            ],
        )
        .unwrap()
    }

    #[test]
    fn three_rows_by_hand() {
        let stats = TenantStats { mean_login: 10.0, p80_purchase: 100.0, rows: 3 };
        let out = features_batch(&stats, 100, &enc_batch()).unwrap();
        assert_eq!(out.schema(), features_schema(true));
        let i = |c: usize| out.column(c).as_primitive::<Int64Type>().values().to_vec();
        let f = |c: usize| out.column(c).as_primitive::<Float64Type>().values().to_vec();
        assert_eq!(i(3), vec![90, 0, 45]); // Recency_Days
        assert_eq!(f(4), vec![2.0, 0.0, 0.5]); // Frequency_Ratio
        assert_eq!(i(5), vec![1, 0, 0]); // High_Value_Segment (100 is not > 100)
        assert_eq!(f(6), vec![7.5, 12.5, 20.0]); // Purchase_Login_Ratio, max(login,1)
        let act = f(7);
        assert!((act[0] - 2.0 * (-1.0f64).exp()).abs() < 1e-15);
        assert_eq!(act[1], 0.0);
        assert!((act[2] - 0.5 * (-0.5f64).exp()).abs() < 1e-15);
        assert!(!out.column(8).as_boolean().value(1));
        assert_eq!(out.column(2).as_fixed_size_binary().value(2), &[3u8; 32]);
    }

    #[test]
    fn fit_stats_matches_fit_and_transform_file() {
        let d = tempfile::tempdir().unwrap();
        let raw = d.path().join("raw.parquet");
        crate::data::generate::generate_tenant(&raw, "A", 70_000, 3, 20454).unwrap();
        let s = fit_stats(&raw).unwrap();
        let (mut l, mut p) = (vec![], vec![]);
        for b in open_batches(&raw, 1000).unwrap() {
            let b = b.unwrap();
            l.extend_from_slice(b.column(3).as_primitive::<Int64Type>().values());
            p.extend_from_slice(b.column(4).as_primitive::<Float64Type>().values());
        }
        assert_eq!(s, v1::fit(&l, &mut p));
        // transform_file over an encrypted-shaped file.
        let enc = d.path().join("enc.parquet");
        let mut sink = ParquetSink::create(&enc, encrypted_schema(true), vec![]).unwrap();
        sink.write(&enc_batch()).unwrap();
        sink.finish().unwrap();
        let out = d.path().join("f.parquet");
        let stats = TenantStats { mean_login: 10.0, p80_purchase: 100.0, rows: 3 };
        assert_eq!(transform_file(&enc, &out, &stats, 100, vec![("k".into(), "v".into())]).unwrap(), 3);
        let got: Vec<_> = open_batches(&out, 10).unwrap().collect::<Result<_>>().unwrap();
        assert_eq!(got[0], features_batch(&stats, 100, &enc_batch()).unwrap());
        assert_eq!(fit_stats(&enc).unwrap(), v1::fit(&[20, 0, 5], &mut [150.0, 12.5, 100.0]));
    }

    /// The spliced path (several row groups) and the ordinary path (an input
    /// whose columns cannot be spliced: a nullable tenant column) write the
    /// same rows, schema and footer entries as `features_batch`.
    #[test]
    fn transform_file_spliced_and_ordinary_paths_agree() {
        use parquet::arrow::ArrowWriter;
        let d = tempfile::tempdir().unwrap();
        let stats = TenantStats { mean_login: 10.0, p80_purchase: 100.0, rows: 3 };
        let batches: Vec<RecordBatch> = (0..4).map(|_| enc_batch()).collect();
        let want: Vec<RecordBatch> = batches.iter().map(|b| features_batch(&stats, 100, b).unwrap()).collect();
        let want = arrow_select::concat::concat_batches(&want[0].schema(), &want).unwrap();
        let nullable = {
            let s = encrypted_schema(true);
            let mut fields: Vec<arrow_schema::Field> = s.fields().iter().map(|f| f.as_ref().clone()).collect();
            fields[0] = fields[0].clone().with_nullable(true);
            Arc::new(arrow_schema::Schema::new(fields))
        };
        for (name, schema) in [("spliced", encrypted_schema(true)), ("ordinary", nullable)] {
            let enc = d.path().join(format!("{name}.enc.parquet"));
            let props = crate::data::parquet_io::writer_props().into_builder().set_max_row_group_row_count(Some(5)).build();
            let mut w = ArrowWriter::try_new(std::fs::File::create(&enc).unwrap(), schema.clone(), Some(props)).unwrap();
            for b in &batches {
                w.write(&RecordBatch::try_new(schema.clone(), b.columns().to_vec()).unwrap()).unwrap();
            }
            w.close().unwrap();
            let out = d.path().join(format!("{name}.f.parquet"));
            assert_eq!(transform_file(&enc, &out, &stats, 100, vec![("k".into(), "v".into())]).unwrap(), 12, "{name}");
            let got: Vec<_> = open_batches(&out, 100).unwrap().collect::<Result<_>>().unwrap();
            assert_eq!(got[0], want, "{name}");
            assert_eq!(crate::data::parquet_io::read_footer_kv(&out).unwrap()["k"], "v", "{name}");
            // spliced: the source's row groups (5, 5, 2); ordinary: rewritten (one group)
            let groups = ParquetRecordBatchReaderBuilder::try_new(File::open(&out).unwrap()).unwrap().metadata().num_row_groups();
            assert_eq!(groups, if name == "spliced" { 3 } else { 1 }, "{name}");
        }
    }
}
