//! Progress output: indicatif bars on a terminal, one plain line per event
//! otherwise (cron, CI, pipes). `-q` silences both.

use super::runs::{StageRecord, Status};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::Duration;

/// Print a line on stdout. A closed stdout (`dagrun run … | head`, a log
/// collector that went away) neither stops nor crashes a run: the line is
/// dropped (`println!` would panic in the worker thread that printed it).
pub fn say(s: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{s}");
    let _ = out.flush();
}

/// How much to print.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verbosity {
    Quiet,
    Normal,
    Verbose,
}

enum Mode {
    Quiet,
    Plain,
    Bars { multi: MultiProgress, overall: ProgressBar, running: Mutex<HashMap<String, ProgressBar>> },
}

/// Reports stage events as they happen.
pub struct Reporter {
    mode: Mode,
    verbose: bool,
}

fn symbol(s: Status) -> &'static str {
    match s {
        Status::Ran => "ran     ",
        Status::Cached => "cached  ",
        Status::Restored => "restored",
        Status::Failed => "FAILED  ",
        Status::Skipped => "skipped ",
    }
}

impl Reporter {
    pub fn new(v: Verbosity, total: usize) -> Reporter {
        let verbose = v == Verbosity::Verbose;
        let mode = match v {
            Verbosity::Quiet => Mode::Quiet,
            _ if std::io::stdout().is_terminal() && std::env::var_os("DAGRUN_PLAIN").is_none() => {
                let multi = MultiProgress::new();
                let overall = multi.add(ProgressBar::new(total as u64));
                overall.set_style(ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} stages {msg}").unwrap().progress_chars("=> "));
                Mode::Bars { multi, overall, running: Mutex::new(HashMap::new()) }
            }
            _ => Mode::Plain,
        };
        Reporter { mode, verbose }
    }

    pub fn started(&self, stage: &str) {
        match &self.mode {
            Mode::Bars { multi, running, .. } => {
                let pb = multi.add(ProgressBar::new_spinner());
                pb.set_style(ProgressStyle::with_template("  {spinner} {msg} {elapsed}").unwrap());
                pb.set_message(stage.to_string());
                pb.enable_steady_tick(Duration::from_millis(120));
                running.lock().unwrap().insert(stage.to_string(), pb);
            }
            Mode::Plain if self.verbose => {
                say(&format!("[dagrun] start    {stage}"));
            }
            _ => {}
        }
    }

    pub fn finished(&self, rec: &StageRecord) {
        let mut line = format!("{} {} ({:.2}s)", symbol(rec.status), rec.stage, rec.seconds);
        if rec.status == Status::Ran && rec.outputs_changed == Some(false) {
            line.push_str(" — outputs unchanged, dependents stay cached");
        }
        // A stage left unrecorded shows that first: it is what the next run acts on.
        let shown = if rec.recorded == Some(false) { rec.reasons.last() } else { rec.reasons.first() };
        if let Some(first) = shown
            && matches!(rec.status, Status::Ran | Status::Restored)
        {
            line.push_str(&format!(" — {first}"));
            if rec.reasons.len() > 1 {
                line.push_str(&format!(" (+{} more)", rec.reasons.len() - 1));
            }
        }
        if let (Status::Skipped, Some(e)) = (rec.status, &rec.error) {
            line.push_str(&format!(" — {e}"));
        }
        // Reasons and errors may quote file names or a command's output: shown, never obeyed.
        let line = crate::util::escape_controls_in_lines(&line);
        match &self.mode {
            Mode::Quiet => {}
            Mode::Plain => {
                if rec.status != Status::Cached || self.verbose {
                    say(&format!("[dagrun] {line}"));
                }
            }
            Mode::Bars { multi, overall, running } => {
                if let Some(pb) = running.lock().unwrap().remove(&rec.stage) {
                    pb.finish_and_clear();
                    multi.remove(&pb);
                }
                if rec.status != Status::Cached || self.verbose {
                    let _ = multi.println(line);
                }
                overall.inc(1);
            }
        }
    }

    /// Print a line (above the bars on a terminal).
    pub fn line(&self, s: &str) {
        match &self.mode {
            Mode::Quiet => {}
            Mode::Plain => say(s),
            Mode::Bars { multi, .. } => {
                let _ = multi.println(s);
            }
        }
    }

    pub fn done(&self) {
        if let Mode::Bars { overall, .. } = &self.mode {
            overall.finish_and_clear();
        }
    }
}
