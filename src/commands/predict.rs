//! `dagrun predict`: Models-as-a-Service from the command line. Raw rows of
//! one tenant in (CSV or Parquet, spec §2 columns, label optional), scores out
//! (CSV with a header, or JSON lines): `Customer_ID, score, model_version,
//! feature_version`. Rows of another tenant, unknown columns and a model whose
//! hash does not match its lineage record are refused.

use crate::data::ingest::{IngestOptions, open_raw};
use crate::scoring::load_deployed;
use crate::util::atomic::AtomicFile;
use anyhow::{Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Csv,
    JsonLines,
}

impl Format {
    /// From `--format`, else the output file's extension (default CSV).
    pub fn choose(flag: Option<&str>, output: Option<&Path>) -> Result<Format> {
        let pick = |s: &str| match s.to_ascii_lowercase().as_str() {
            "csv" => Some(Format::Csv),
            "json" | "jsonl" | "ndjson" | "jsonlines" => Some(Format::JsonLines),
            _ => None,
        };
        if let Some(f) = flag {
            return pick(f).ok_or_else(|| crate::error::config(format!("--format {f}: use csv or jsonl")));
        }
        Ok(output.and_then(|p| p.extension()).and_then(|e| pick(&e.to_string_lossy())).unwrap_or(Format::Csv))
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
    let mut sink: Box<dyn Write> = Box::new(std::io::BufWriter::new(crate::util::stdout::Stdout));
    let mut file = match &args.output {
        Some(p) => Some(AtomicFile::create(p)?),
        None => None,
    };
    let out: &mut dyn Write = match file.as_mut() {
        Some(f) => f,
        None => &mut sink,
    };
    let mv = &deployed.artifact.model_version;
    let fv = &deployed.artifact.feature_set_version;
    if format == Format::Csv {
        writeln!(out, "Customer_ID,score,model_version,feature_version")?;
    }
    let mut rows = 0u64;
    for batch in reader {
        let batch = batch.map_err(|e| crate::error::config(format!("{e:#}")))?;
        for (id, score) in deployed.score_batch(&batch)? {
            match format {
                Format::Csv => writeln!(out, "{id},{score},{mv},{fv}")?,
                Format::JsonLines => writeln!(out, "{}", serde_json::json!({"Customer_ID": id, "score": score, "model_version": mv, "feature_version": fv}))?,
            }
            rows += 1;
        }
    }
    out.flush()?;
    if let Some(f) = file {
        f.commit().context("writing the scores")?;
    }
    Ok(rows)
}
