//! Parquet writing (atomic, deterministic bytes) and streaming reading.

use crate::util::atomic::AtomicFile;
use anyhow::{Context, Result};
use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::Compression;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// Value of the footer's `created_by`: fixed so that a parquet upgrade does
/// not change file hashes by itself.
pub const CREATED_BY: &str = "dagrun";

/// Rows per row group of the files dagrun writes. A writer holds a whole
/// row group's encoded pages in memory until it is complete, and the
/// spliced rewrite (`encrypt`) works row group by row group: at parquet's
/// default (1M rows) a tenant of 600k rows was one row group, so every
/// stage held the whole tenant at once. 128k rows (two read batches) keeps
/// that memory bounded and independent of the tenant's size.
pub const ROW_GROUP_ROWS: usize = 131_072;

/// Writer properties used for every file dagrun writes: snappy, fixed
/// `created_by`, row groups of [`ROW_GROUP_ROWS`], everything else at
/// parquet's (deterministic) defaults.
pub fn writer_props() -> WriterProperties {
    use parquet::schema::types::ColumnPath;
    let mut b = WriterProperties::builder()
        .set_created_by(CREATED_BY.to_string())
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS));
    // Ciphertexts, tokens and PII are random or unique per row: dictionary
    // encoding and compression only cost CPU on them.
    for c in ["Sensitive_Data_Enc", "Sensitive_Token", "Sensitive_Data"] {
        b = b.set_column_dictionary_enabled(ColumnPath::from(c), false).set_column_compression(ColumnPath::from(c), Compression::UNCOMPRESSED);
    }
    // Min/max statistics of random bytes tell a reader nothing and cost a
    // comparison per value: none for ciphertexts and tokens. (Sensitive_Data
    // keeps its defaults: the raw file's bytes stay those of generator v1.)
    for c in ["Sensitive_Data_Enc", "Sensitive_Token"] {
        b = b.set_column_statistics_enabled(ColumnPath::from(c), EnabledStatistics::None);
    }
    b.set_column_dictionary_enabled(ColumnPath::from("Customer_ID"), false).build()
}

/// A Parquet file being written atomically: nothing appears at the
/// destination until [`ParquetSink::finish`]; dropped before that, the
/// temporary file is removed.
pub struct ParquetSink {
    path: PathBuf,
    writer: ArrowWriter<AtomicFile>,
    rows: u64,
}

impl ParquetSink {
    /// Start writing `path` with `schema`; `kv_metadata` goes into the footer.
    pub fn create(path: &Path, schema: SchemaRef, kv_metadata: Vec<(String, String)>) -> Result<Self> {
        Self::with_file(AtomicFile::create(path)?, path, schema, kv_metadata)
    }

    /// Like [`ParquetSink::create`] for plaintext PII (raw data): the file and
    /// its temporary file are mode 0600 from the first byte.
    pub fn create_private(path: &Path, schema: SchemaRef, kv_metadata: Vec<(String, String)>) -> Result<Self> {
        Self::with_file(AtomicFile::create_private(path)?, path, schema, kv_metadata)
    }

    fn with_file(file: AtomicFile, path: &Path, schema: SchemaRef, kv_metadata: Vec<(String, String)>) -> Result<Self> {
        let mut writer = ArrowWriter::try_new(file, schema, Some(writer_props())).with_context(|| format!("cannot start Parquet file {}", path.display()))?;
        for (k, v) in kv_metadata {
            writer.append_key_value_metadata(KeyValue::new(k, v));
        }
        Ok(ParquetSink { path: path.to_path_buf(), writer, rows: 0 })
    }

    /// Append one batch (its schema must equal the sink's).
    pub fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        self.writer.write(batch).with_context(|| format!("cannot write Parquet file {}", self.path.display()))?;
        self.rows += batch.num_rows() as u64;
        Ok(())
    }

    /// Rows written so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Write the footer, fsync and move the file into place.
    pub fn finish(self) -> Result<()> {
        let file = self.writer.into_inner().with_context(|| format!("cannot finish Parquet file {}", self.path.display()))?;
        file.commit()
    }
}

fn open_builder(path: &Path) -> Result<ParquetRecordBatchReaderBuilder<File>> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    ParquetRecordBatchReaderBuilder::try_new(file).with_context(|| format!("{} is not a readable Parquet file", path.display()))
}

/// Footer key-value metadata of a Parquet file.
pub fn read_footer_kv(path: &Path) -> Result<BTreeMap<String, String>> {
    let b = open_builder(path)?;
    Ok(footer_kv(b.metadata()))
}

/// Footer key-value metadata from already-read metadata (entries without a value are skipped).
pub fn footer_kv(md: &parquet::file::metadata::ParquetMetaData) -> BTreeMap<String, String> {
    md.file_metadata().key_value_metadata().map(|kvs| kvs.iter().filter_map(|kv| kv.value.clone().map(|v| (kv.key.clone(), v))).collect()).unwrap_or_default()
}

/// Stream a Parquet file as RecordBatches of at most `batch_size` rows.
pub fn open_batches(path: &Path, batch_size: usize) -> Result<impl Iterator<Item = Result<RecordBatch>> + use<>> {
    let reader = open_builder(path)?.with_batch_size(batch_size.max(1)).build().with_context(|| format!("cannot read Parquet file {}", path.display()))?;
    let p = path.to_path_buf();
    Ok(reader.map(move |r| r.with_context(|| format!("cannot read Parquet file {}", p.display()))))
}

/// Stream only the named top-level columns (absent names are skipped; the
/// consumer reports a missing column). Skipping the ciphertext column makes
/// reading an encrypted file several times cheaper.
pub fn open_batches_columns(path: &Path, batch_size: usize, columns: &[&str]) -> Result<impl Iterator<Item = Result<RecordBatch>> + use<>> {
    let b = only_columns(open_builder(path)?, columns);
    let reader = b.with_batch_size(batch_size.max(1)).build().with_context(|| format!("cannot read Parquet file {}", path.display()))?;
    let p = path.to_path_buf();
    Ok(reader.map(move |r| r.with_context(|| format!("cannot read Parquet file {}", p.display()))))
}

/// A reader that decodes only the named top-level columns (names absent
/// from the file are skipped: the consumer reports a missing column).
pub fn only_columns<T: parquet::file::reader::ChunkReader + 'static>(
    b: ParquetRecordBatchReaderBuilder<T>,
    columns: &[&str],
) -> ParquetRecordBatchReaderBuilder<T> {
    let idx: Vec<usize> = columns.iter().filter_map(|c| b.schema().index_of(c).ok()).collect();
    let mask = parquet::arrow::ProjectionMask::roots(b.parquet_schema(), idx);
    b.with_projection(mask)
}

/// Open `src` and read its footer once, page index included when it has one:
/// the column chunks' metadata and the Arrow schema for splicing, and what
/// readers of its row groups are built from (no second parse of the footer).
fn open_with_page_index(src: &Path) -> Result<(File, parquet::arrow::arrow_reader::ArrowReaderMetadata)> {
    use parquet::file::metadata::{PageIndexPolicy, ParquetMetaDataReader};
    let input = File::open(src).with_context(|| format!("cannot open {}", src.display()))?;
    let not_parquet = || format!("{} is not a readable Parquet file", src.display());
    let md = ParquetMetaDataReader::new().with_page_index_policy(PageIndexPolicy::Optional).parse_and_finish(&input).with_context(not_parquet)?;
    let md = parquet::arrow::arrow_reader::ArrowReaderMetadata::try_new(std::sync::Arc::new(md), Default::default()).with_context(not_parquet)?;
    Ok((input, md))
}

/// A writer that hashes (blake3) every byte it passes on: the hash of a file
/// as it is written, so the writer need not read it back to hash it.
pub struct HashingWrite<W> {
    inner: W,
    hasher: blake3::Hasher,
}

impl<W: std::io::Write> HashingWrite<W> {
    pub fn new(inner: W) -> Self {
        HashingWrite { inner, hasher: blake3::Hasher::new() }
    }
    /// The inner writer and the blake3 (hex) of everything written through.
    pub fn finish(self) -> (W, String) {
        (self.inner, self.hasher.finalize().to_hex().to_string())
    }
}

impl<W: std::io::Write> std::io::Write for HashingWrite<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Copy a Parquet file to `dest` (atomically) without decoding it: every
/// column chunk's bytes are spliced into a new file whose footer carries the
/// source's key-value metadata (including the embedded Arrow schema) updated
/// with `kv`. Returns the Arrow schema, the row count and the blake3 (hex) of
/// the bytes written (hashed on the way out: no read back). Deterministic.
pub fn copy_with_footer(src: &Path, dest: &Path, kv: Vec<(String, String)>) -> Result<(SchemaRef, u64, String)> {
    use parquet::column::writer::ColumnCloseResult;
    use parquet::file::writer::SerializedFileWriter;
    let (input, md) = open_with_page_index(src)?;
    let schema = md.schema().clone();
    let md = md.metadata();
    let mut merged: BTreeMap<String, String> = footer_kv(md);
    for (k, v) in kv {
        merged.insert(k, v);
    }
    let props = writer_props().into_builder().set_key_value_metadata(Some(merged.into_iter().map(|(k, v)| KeyValue::new(k, v)).collect())).build();
    let root = md.file_metadata().schema_descr().root_schema_ptr();
    let out = HashingWrite::new(AtomicFile::create(dest)?);
    let ctx = || format!("cannot write Parquet file {}", dest.display());
    let mut writer = SerializedFileWriter::new(out, root, std::sync::Arc::new(props)).with_context(ctx)?;
    let page_index = md.page_index();
    let mut rows = 0u64;
    for (rg_idx, rg) in md.row_groups().iter().enumerate() {
        let mut rg_out = writer.next_row_group().with_context(ctx)?;
        for (col_idx, column) in rg.columns().iter().enumerate() {
            let result = ColumnCloseResult {
                bytes_written: column.compressed_size() as _,
                rows_written: rg.num_rows() as _,
                metadata: column.clone(),
                bloom_filter: None,
                column_index: page_index.and_then(|pi| pi.column_index(rg_idx, col_idx)).cloned(),
                offset_index: page_index.and_then(|pi| pi.offset_index(rg_idx, col_idx)).cloned(),
            };
            rg_out.append_column(&input, result).with_context(ctx)?;
        }
        rg_out.close().with_context(ctx)?;
        rows += rg.num_rows() as u64;
    }
    let (file, hash) = writer.into_inner().with_context(ctx)?.finish();
    file.commit()?;
    Ok((schema, rows, hash))
}

/// The file [`rewrite_with_spliced_columns`] writes: its Arrow schema and footer entries.
pub struct Output {
    pub schema: SchemaRef,
    pub kv_metadata: Vec<(String, String)>,
}

/// Which columns [`rewrite_with_spliced_columns`] computes, which source
/// columns the computation reads, and in batches of how many rows.
pub struct SpliceColumns<'a> {
    pub computed: &'a [&'a str],
    pub read: &'a [&'a str],
    pub batch_size: usize,
}

/// Write `dest` (atomically) from `src`, row group by row group, where most
/// columns pass through unchanged: the columns of `out_schema` named in
/// `computed` come from `compute`, called with each batch of at most
/// `batch_size` rows of `read` (columns of `src`, read per row group) and
/// returning one array per computed column, in `out_schema` order; every
/// other column is spliced from `src` — its column chunk's bytes, statistics
/// and page index are copied, not decoded and encoded again. Row groups keep
/// `src`'s boundaries, so spliced and computed chunks line up row for row.
///
/// Returns `Ok(None)` before writing anything when `src` does not allow it
/// (a column to splice is missing from `src` or has another Parquet type or
/// repetition, a schema is nested, `src` has no row groups): the caller then
/// writes the file the ordinary way. Otherwise the row count.
pub fn rewrite_with_spliced_columns(
    src: &Path,
    dest: &Path,
    out: Output,
    columns: SpliceColumns,
    mut compute: impl FnMut(&RecordBatch) -> Result<Vec<arrow_array::ArrayRef>>,
) -> Result<Option<u64>> {
    let Output { schema: out_schema, kv_metadata } = out;
    let SpliceColumns { computed, read, batch_size } = columns;
    use parquet::arrow::ArrowSchemaConverter;
    use parquet::arrow::arrow_writer::compute_leaves;
    use parquet::column::writer::ColumnCloseResult;
    let (input, reader_md) = open_with_page_index(src)?;
    let md = reader_md.metadata();
    let props = writer_props();
    let out_descr = ArrowSchemaConverter::new().with_coerce_types(props.coerce_types()).convert(&out_schema)?;
    let in_descr = md.file_metadata().schema_descr();
    // One leaf per top-level field (flat schemas only), then: where each
    // output column comes from.
    if out_descr.num_columns() != out_schema.fields().len() || md.num_row_groups() == 0 {
        return Ok(None);
    }
    let source: Vec<Option<usize>> = (0..out_descr.num_columns())
        .map(|i| {
            let want = out_descr.column(i);
            (0..in_descr.num_columns()).find(|&j| {
                let have = in_descr.column(j);
                have.path() == want.path() && have.self_type() == want.self_type() && in_descr.get_column_root_idx(j) == j
            })
        })
        .collect();
    let is_computed = |i: usize| computed.contains(&out_schema.field(i).name().as_str());
    if in_descr.num_columns() != in_descr.root_schema().get_fields().len() || (0..source.len()).any(|i| !is_computed(i) && source[i].is_none()) {
        return Ok(None);
    }
    let source: Vec<Option<usize>> = source.into_iter().enumerate().map(|(i, s)| if is_computed(i) { None } else { s }).collect();
    let computed: Vec<usize> = (0..source.len()).filter(|&i| source[i].is_none()).collect();
    let mut writer = ArrowWriter::try_new(AtomicFile::create(dest)?, out_schema.clone(), Some(props))
        .with_context(|| format!("cannot start Parquet file {}", dest.display()))?;
    for (k, v) in kv_metadata {
        writer.append_key_value_metadata(KeyValue::new(k, v));
    }
    let ctx = || format!("cannot write Parquet file {}", dest.display());
    let (mut file_writer, factory) = writer.into_serialized_writer().with_context(ctx)?;
    let page_index = md.page_index();
    let mut rows = 0u64;
    for (rg_idx, rg) in md.row_groups().iter().enumerate() {
        let mut writers: Vec<Option<parquet::arrow::arrow_writer::ArrowColumnWriter>> =
            factory.create_column_writers(rg_idx).with_context(ctx)?.into_iter().map(Some).collect();
        let b =
            ParquetRecordBatchReaderBuilder::new_with_metadata(input.try_clone().with_context(|| format!("cannot open {}", src.display()))?, reader_md.clone());
        let reader = only_columns(b, read)
            .with_row_groups(vec![rg_idx])
            .with_batch_size(batch_size.max(1))
            .build()
            .with_context(|| format!("cannot read Parquet file {}", src.display()))?;
        let mut rg_rows = 0u64;
        for batch in reader {
            let batch = batch.with_context(|| format!("cannot read Parquet file {}", src.display()))?;
            rg_rows += batch.num_rows() as u64;
            let arrays = compute(&batch)?;
            anyhow::ensure!(arrays.len() == computed.len(), "internal error: {} computed columns, {} expected", arrays.len(), computed.len());
            for (&i, array) in computed.iter().zip(&arrays) {
                anyhow::ensure!(array.len() == batch.num_rows(), "internal error: computed column of {} rows for a batch of {}", array.len(), batch.num_rows());
                let w = writers[i].as_mut().expect("writer of a computed column");
                for leaf in compute_leaves(out_schema.field(i), array).with_context(ctx)? {
                    w.write(&leaf).with_context(ctx)?;
                }
            }
        }
        anyhow::ensure!(rg_rows == rg.num_rows() as u64, "{}: row group {rg_idx} holds {} rows, its footer says {}", src.display(), rg_rows, rg.num_rows());
        let mut rg_out = file_writer.next_row_group().with_context(ctx)?;
        for (i, from) in source.iter().enumerate() {
            match from {
                Some(j) => {
                    let column = rg.column(*j);
                    let result = ColumnCloseResult {
                        bytes_written: column.compressed_size() as _,
                        rows_written: rg.num_rows() as _,
                        metadata: column.clone(),
                        bloom_filter: None,
                        column_index: page_index.and_then(|pi| pi.column_index(rg_idx, *j)).cloned(),
                        offset_index: page_index.and_then(|pi| pi.offset_index(rg_idx, *j)).cloned(),
                    };
                    rg_out.append_column(&input, result).with_context(ctx)?;
                }
                None => {
                    writers[i].take().expect("one chunk per computed column").close().with_context(ctx)?.append_to_row_group(&mut rg_out).with_context(ctx)?
                }
            }
        }
        rg_out.close().with_context(ctx)?;
        rows += rg_rows;
    }
    let file = file_writer.into_inner().with_context(ctx)?;
    file.commit()?;
    Ok(Some(rows))
}

/// Arrow schema of a Parquet file (as the reader will produce it).
pub fn read_schema(path: &Path) -> Result<SchemaRef> {
    Ok(open_builder(path)?.schema().clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::schema::raw_schema;
    use arrow_array::*;
    use std::sync::Arc;

    fn batch() -> RecordBatch {
        RecordBatch::try_new(
            raw_schema(true),
            vec![
                Arc::new(StringArray::from(vec!["T", "T"])),
                Arc::new(Int64Array::from(vec![0, 1])),
                Arc::new(StringArray::from(vec!["a@x", "b@x"])),
                Arc::new(Int64Array::from(vec![3, 4])),
                Arc::new(Float64Array::from(vec![1.5, 2.25])),
                Arc::new(Date32Array::from(vec![20000, 20001])),
                Arc::new(BooleanArray::from(vec![true, false])),
            ],
        )
        .unwrap()
    }

    #[test]
    fn round_trip_with_footer_and_determinism() {
        let d = tempfile::tempdir().unwrap();
        let write = |p: &Path| {
            let mut s = ParquetSink::create(p, raw_schema(true), vec![("dagrun.x".into(), "1".into())]).unwrap();
            s.write(&batch()).unwrap();
            s.finish().unwrap();
        };
        let (p1, p2) = (d.path().join("a.parquet"), d.path().join("b.parquet"));
        write(&p1);
        write(&p2);
        assert_eq!(std::fs::read(&p1).unwrap(), std::fs::read(&p2).unwrap());
        assert_eq!(read_footer_kv(&p1).unwrap().get("dagrun.x").map(String::as_str), Some("1"));
        let got: Vec<_> = open_batches(&p1, 1).unwrap().collect::<Result<_>>().unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].schema(), raw_schema(true));
        assert_eq!(got[0], batch().slice(0, 1));
        assert_eq!(got[1], batch().slice(1, 1));
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 2);
    }

    #[test]
    fn dropped_sink_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        {
            let mut s = ParquetSink::create(&d.path().join("x.parquet"), raw_schema(true), vec![]).unwrap();
            s.write(&batch()).unwrap();
        }
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }

    /// Splicing gives the same decoded file (schema, rows, footer) as writing
    /// every column, keeps the source's row groups, and refuses (writing
    /// nothing) a source whose column to splice has another type.
    #[test]
    fn spliced_rewrite_equals_an_ordinary_write() {
        use arrow_schema::{DataType, Field, Schema};
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src.parquet");
        let props_rows = 3; // several row groups: small files still cover the boundaries
        {
            let file = AtomicFile::create(&src).unwrap();
            let props = writer_props().into_builder().set_max_row_group_row_count(Some(props_rows)).build();
            let mut w = ArrowWriter::try_new(file, raw_schema(true), Some(props)).unwrap();
            for _ in 0..4 {
                w.write(&batch()).unwrap();
            }
            w.into_inner().unwrap().commit().unwrap();
        }
        // Out: Tenant_ID, Customer_ID, a computed "Len" (length of Sensitive_Data), Login_Count.
        let out_schema = Arc::new(Schema::new(vec![
            raw_schema(true).field(0).clone(),
            raw_schema(true).field(1).clone(),
            Field::new("Len", DataType::Int64, false),
            raw_schema(true).field(3).clone(),
        ]));
        let compute = |b: &RecordBatch| -> Result<Vec<arrow_array::ArrayRef>> {
            let pii = b.column_by_name("Sensitive_Data").unwrap().as_any().downcast_ref::<StringArray>().unwrap();
            Ok(vec![Arc::new(Int64Array::from_iter_values(pii.iter().map(|v| v.unwrap().len() as i64)))])
        };
        let dest = d.path().join("dest.parquet");
        let cols = || SpliceColumns { computed: &["Len"], read: &["Sensitive_Data"], batch_size: 2 };
        let out = Output { schema: out_schema.clone(), kv_metadata: vec![("k".into(), "v".into())] };
        let rows = rewrite_with_spliced_columns(&src, &dest, out, cols(), compute).unwrap();
        assert_eq!(rows, Some(8));
        let got: Vec<RecordBatch> = open_batches(&dest, 100).unwrap().collect::<Result<_>>().unwrap();
        let got = arrow_select::concat::concat_batches(&out_schema, &got).unwrap();
        let one = RecordBatch::try_new(
            out_schema.clone(),
            vec![batch().column(0).clone(), batch().column(1).clone(), Arc::new(Int64Array::from(vec![3, 3])), batch().column(3).clone()],
        )
        .unwrap();
        let want = arrow_select::concat::concat_batches(&out_schema, &[one.clone(), one.clone(), one.clone(), one]).unwrap();
        assert_eq!(got, want);
        assert_eq!(read_footer_kv(&dest).unwrap().get("k").map(String::as_str), Some("v"));
        let md = open_builder(&dest).unwrap().metadata().clone();
        assert_eq!(md.row_groups().iter().map(|rg| rg.num_rows()).collect::<Vec<_>>(), vec![3, 3, 2]);
        // A column to splice with another type: refused before anything is written.
        let other = Arc::new(Schema::new(vec![Field::new("Customer_ID", DataType::Int32, false), Field::new("Len", DataType::Int64, false)]));
        let dest2 = d.path().join("dest2.parquet");
        assert_eq!(rewrite_with_spliced_columns(&src, &dest2, Output { schema: other, kv_metadata: vec![] }, cols(), compute).unwrap(), None);
        assert!(!dest2.exists());
    }
}
