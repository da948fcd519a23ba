//! `dagrun predict`: Models-as-a-Service from the command line. Raw rows of
//! one tenant in (CSV or Parquet, spec §2 columns, label optional), scores out
//! (CSV with a header, JSON lines, or a Parquet file): `Customer_ID, score,
//! model_version, feature_version`, written batch by batch as the input is
//! read. Rows of another tenant, unknown columns and a model whose
//! hash does not match its lineage record are refused.

use crate::data::ingest::{IngestOptions, open_raw};
use crate::data::parquet_io::ParquetSink;
use crate::scoring::load_deployed;
use crate::util::atomic::AtomicFile;
use anyhow::{Context, Result};
use arrow_array::{ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Csv,
    JsonLines,
    /// Columns `Customer_ID` (int64), `score` (double), `model_version`,
    /// `feature_version` (string); only to a file (`--output`).
    Parquet,
}

impl Format {
    /// From `--format`, else the output file's extension (default CSV).
    pub fn choose(flag: Option<&str>, output: Option<&Path>) -> Result<Format> {
        let pick = |s: &str| match s.to_ascii_lowercase().as_str() {
            "csv" => Some(Format::Csv),
            "json" | "jsonl" | "ndjson" | "jsonlines" => Some(Format::JsonLines),
            "parquet" | "pq" => Some(Format::Parquet),
            _ => None,
        };
        let format = match flag {
            Some(f) => pick(f).ok_or_else(|| crate::error::config(format!("--format {f}: use csv, jsonl or parquet")))?,
            None => output.and_then(|p| p.extension()).and_then(|e| pick(&e.to_string_lossy())).unwrap_or(Format::Csv),
        };
        if format == Format::Parquet && output.is_none() {
            return Err(crate::error::config("--format parquet writes a file: give it with --output FILE.parquet (stdout takes csv or jsonl)"));
        }
        Ok(format)
    }
}

pub struct PredictArgs {
    pub tenant: String,
    pub input: PathBuf,
    pub output: Option<PathBuf>,
    pub format: Option<String>,
    pub model: Option<String>,
}

/// Refuse `--output` naming the input file itself (or another name of it, a
/// hard link): the scores would replace the raw rows, perhaps their only
/// copy. A link at `--output` is replaced, never followed, so only the file
/// that stands there counts.
fn refuse_output_over_input(input: &Path, output: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let (Ok(i), Ok(o)) = (std::fs::metadata(input), std::fs::symlink_metadata(output)) else { return Ok(()) };
    if o.is_file() && (i.dev(), i.ino()) == (o.dev(), o.ino()) {
        return Err(crate::error::config(format!(
            "--output {} is the input file {}: the scores would replace the rows; write them to another file",
            output.display(),
            input.display()
        )));
    }
    Ok(())
}

/// The scores' Parquet schema: the CSV's columns, typed.
fn parquet_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("Customer_ID", DataType::Int64, false),
        Field::new("score", DataType::Float64, false),
        Field::new("model_version", DataType::Utf8, false),
        Field::new("feature_version", DataType::Utf8, false),
    ]))
}

/// One input batch's scores as a record batch of [`parquet_schema`].
fn parquet_batch(scored: &[(i64, f64)], model_version: &str, feature_version: &str) -> Result<RecordBatch> {
    let n = scored.len();
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from_iter_values(scored.iter().map(|s| s.0))),
        Arc::new(Float64Array::from_iter_values(scored.iter().map(|s| s.1))),
        Arc::new(StringArray::from_iter_values(std::iter::repeat_n(model_version, n))),
        Arc::new(StringArray::from_iter_values(std::iter::repeat_n(feature_version, n))),
    ];
    Ok(RecordBatch::try_new(parquet_schema(), columns)?)
}

/// Score `args.input`; returns the number of rows scored.
pub fn predict(workspace: &Path, args: &PredictArgs) -> Result<u64> {
    crate::pipeline::tenants::validate_tenant_id(&args.tenant).map_err(|m| crate::error::config(format!("--tenant: {m}")))?;
    let format = Format::choose(args.format.as_deref(), args.output.as_deref())?;
    if let Some(o) = &args.output {
        crate::workspace::Workspace::at(workspace).check_user_output(o, "--output")?;
        refuse_output_over_input(&args.input, o)?;
    }
    let deployed = load_deployed(workspace, &args.tenant, args.model.as_deref())?;
    // Rows dated after the feature version's as_of would get a negative
    // Recency_Days, outside anything the model was trained on: refused.
    // The workspace's tenants, so that a row of another configured tenant is
    // named in a refusal (any other tenant-id-shaped value is only described).
    let known = crate::pipeline::tenants::Tenants::load(workspace).ok().map(|t| {
        let mut ids: Vec<String> = t.ids().map(str::to_string).collect();
        ids.push(args.tenant.clone());
        ids
    });
    let opts = IngestOptions::for_scoring(&args.tenant, deployed.as_of, known);
    let mut reader = open_raw(&args.input, &opts, crate::data::DEFAULT_BATCH_SIZE).map_err(|e| crate::error::config(format!("{e:#}")))?.peekable();
    // Validate the first batch before anything is written, so an empty,
    // header-only or immediately bad file prints no score header.
    if matches!(reader.peek(), Some(Err(_)))
        && let Some(Err(e)) = reader.next()
    {
        return Err(crate::error::config(format!("{e:#}")));
    }
    let mv = &deployed.artifact.model_version;
    let fv = &deployed.artifact.feature_set_version;
    let mut rows = 0u64;
    // Into a file: Ctrl-C, SIGTERM or SIGHUP stop at the next batch and the
    // temporary file goes (review 17: it was left behind, hidden).
    if args.output.is_some() {
        crate::util::interrupt::catch();
    }
    if format == Format::Parquet {
        let path = args.output.as_deref().expect("Format::choose refuses parquet without --output");
        let mut sink = ParquetSink::create(path, parquet_schema(), Vec::new())?;
        for batch in reader {
            crate::util::interrupt::check()?;
            let batch = batch.map_err(|e| crate::error::config(format!("{e:#}")))?;
            let scored = deployed.score_batch(&batch)?;
            rows += scored.len() as u64;
            sink.write(&parquet_batch(&scored, mv, fv)?)?;
        }
        crate::util::interrupt::check()?;
        sink.finish().context("writing the scores")?;
        return Ok(rows);
    }
    let mut sink: Box<dyn Write> = Box::new(std::io::BufWriter::new(crate::util::stdout::Stdout));
    let mut file = match &args.output {
        Some(p) => Some(AtomicFile::create(p)?),
        None => None,
    };
    // A failed write names the file (a full disk, a file-size limit).
    let named = |e: std::io::Error| match &args.output {
        Some(p) => anyhow::anyhow!("cannot write the scores to {}: {e} (is the disk full, or a file-size limit reached?)", p.display()),
        None => e.into(),
    };
    let out: &mut dyn Write = match file.as_mut() {
        Some(f) => f,
        None => &mut sink,
    };
    if format == Format::Csv {
        writeln!(out, "Customer_ID,score,model_version,feature_version").map_err(named)?;
    }
    for batch in reader {
        crate::util::interrupt::check()?;
        let batch = batch.map_err(|e| crate::error::config(format!("{e:#}")))?;
        for (id, score) in deployed.score_batch(&batch)? {
            match format {
                Format::Csv => writeln!(out, "{id},{score},{mv},{fv}"),
                Format::JsonLines => writeln!(out, "{}", serde_json::json!({"Customer_ID": id, "score": score, "model_version": mv, "feature_version": fv})),
                Format::Parquet => unreachable!("written above"),
            }
            .map_err(named)?;
            rows += 1;
        }
    }
    out.flush().map_err(named)?;
    crate::util::interrupt::check()?;
    if let Some(f) = file {
        f.commit().context("writing the scores")?;
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_format_comes_from_the_flag_else_the_extension_and_parquet_needs_a_file() {
        let choose = |flag: Option<&str>, out: Option<&str>| Format::choose(flag, out.map(Path::new)).map_err(|e| e.to_string());
        assert_eq!(choose(None, None), Ok(Format::Csv));
        assert_eq!(choose(None, Some("s.PARQUET")), Ok(Format::Parquet));
        assert_eq!(choose(None, Some("s.jsonl")), Ok(Format::JsonLines));
        assert_eq!(choose(None, Some("s.txt")), Ok(Format::Csv));
        assert_eq!(choose(Some("csv"), Some("s.parquet")), Ok(Format::Csv));
        assert_eq!(choose(Some("parquet"), Some("s.out")), Ok(Format::Parquet));
        assert!(choose(Some("parquet"), None).unwrap_err().contains("--output FILE.parquet"));
        assert!(choose(Some("xml"), Some("s.xml")).unwrap_err().contains("use csv, jsonl or parquet"));
    }

    #[test]
    fn a_parquet_batch_has_the_csv_columns_typed() {
        let b = parquet_batch(&[(7, 0.25), (9, 0.5)], "m1", "v1.0").unwrap();
        assert_eq!(b.schema(), parquet_schema());
        assert_eq!(b.num_rows(), 2);
        let ids = b.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
        assert_eq!(ids.values().to_vec(), vec![7, 9]);
        let fv = b.column(3).as_any().downcast_ref::<StringArray>().unwrap();
        assert_eq!(fv.value(1), "v1.0");
    }
}
