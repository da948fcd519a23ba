//! Parquet writing (atomic, deterministic bytes) and streaming reading.

use crate::util::atomic::AtomicFile;
use anyhow::{Context, Result};
use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::Compression;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// Value of the footer's `created_by`: fixed so that a parquet upgrade does
/// not change file hashes by itself.
pub const CREATED_BY: &str = "dagrun";

/// Writer properties used for every file dagrun writes: snappy, fixed
/// `created_by`, everything else at parquet's (deterministic) defaults.
pub fn writer_props() -> WriterProperties {
    use parquet::schema::types::ColumnPath;
    let mut b = WriterProperties::builder().set_created_by(CREATED_BY.to_string()).set_compression(Compression::SNAPPY);
    // Ciphertexts, tokens and PII are random or unique per row: dictionary
    // encoding and compression only cost CPU on them.
    for c in ["Sensitive_Data_Enc", "Sensitive_Token", "Sensitive_Data"] {
        b = b.set_column_dictionary_enabled(ColumnPath::from(c), false).set_column_compression(ColumnPath::from(c), Compression::UNCOMPRESSED);
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
    let b = open_builder(path)?;
    let schema = b.schema().clone();
    let idx: Vec<usize> = columns.iter().filter_map(|c| schema.index_of(c).ok()).collect();
    let mask = parquet::arrow::ProjectionMask::roots(b.parquet_schema(), idx);
    let reader = b.with_projection(mask).with_batch_size(batch_size.max(1)).build().with_context(|| format!("cannot read Parquet file {}", path.display()))?;
    let p = path.to_path_buf();
    Ok(reader.map(move |r| r.with_context(|| format!("cannot read Parquet file {}", p.display()))))
}

/// Copy a Parquet file to `dest` (atomically) without decoding it: every
/// column chunk's bytes are spliced into a new file whose footer carries the
/// source's key-value metadata (including the embedded Arrow schema) updated
/// with `kv`. Returns the Arrow schema and the row count. Deterministic.
pub fn copy_with_footer(src: &Path, dest: &Path, kv: Vec<(String, String)>) -> Result<(SchemaRef, u64)> {
    use parquet::column::writer::ColumnCloseResult;
    use parquet::file::metadata::{PageIndexPolicy, ParquetMetaDataReader};
    use parquet::file::writer::SerializedFileWriter;
    let input = File::open(src).with_context(|| format!("cannot open {}", src.display()))?;
    let md = ParquetMetaDataReader::new()
        .with_page_index_policy(PageIndexPolicy::Optional)
        .parse_and_finish(&input)
        .with_context(|| format!("{} is not a readable Parquet file", src.display()))?;
    let schema = read_schema(src)?;
    let mut merged: BTreeMap<String, String> = footer_kv(&md);
    for (k, v) in kv {
        merged.insert(k, v);
    }
    let props = writer_props().into_builder().set_key_value_metadata(Some(merged.into_iter().map(|(k, v)| KeyValue::new(k, v)).collect())).build();
    let root = md.file_metadata().schema_descr().root_schema_ptr();
    let out = AtomicFile::create(dest)?;
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
    let file = writer.into_inner().with_context(ctx)?;
    file.commit()?;
    Ok((schema, rows))
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
}
