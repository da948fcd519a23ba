//! `dagrun report`: one run as a single self-contained HTML file an auditor
//! can open offline.
//!
//! Rules:
//! - Self-contained: CSS inline, charts inline SVG, no script, no external
//!   URL (no CDN, no web font, no image link), so the file opens on an
//!   air-gapped machine exactly as it was written.
//! - Everything taken from files (stage names, params, reasons, errors,
//!   tenant ids, feature names) is HTML-escaped ([`esc`]); chart text is
//!   escaped by plotters' SVG backend, DAG labels are DOT-escaped.
//! - Facts come from the run record and the artifacts it names, read by hash
//!   (`load`): the report of an old run shows that run's models and drift,
//!   not whatever is on disk now. What cannot be found is said, not guessed.
//! - The DAG's edges come from the pipeline file as it is now (the record
//!   keeps stage names, not edges); if it no longer loads, the stages are
//!   drawn without edges and the page says why.
//! - Sections: summary, DAG, timeline, model cards, drift, params, stages.

pub mod charts;
pub mod dag;
pub mod load;

use crate::engine::runs::{RunRecord, RunStatus, Status};
use crate::features::drift::Level;
use anyhow::Result;
use plotters::style::RGBColor;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

pub use dag::Layout;

/// Fill colours per stage status (shared by the DAG, the timeline and the legend).
pub struct StatusColors;

impl Default for StatusColors {
    fn default() -> Self {
        StatusColors
    }
}

impl StatusColors {
    pub fn of(&self, s: Status) -> RGBColor {
        match s {
            Status::Ran => RGBColor(0x2e, 0x8b, 0x57),
            Status::Cached => RGBColor(0x7b, 0x86, 0x94),
            Status::Restored => RGBColor(0x2f, 0x6f, 0xb3),
            Status::Failed => RGBColor(0xc6, 0x28, 0x28),
            Status::Skipped => RGBColor(0xc7, 0x8a, 0x00),
        }
    }
    pub fn hex(&self, s: Status) -> String {
        let RGBColor(r, g, b) = self.of(s);
        format!("#{r:02x}{g:02x}{b:02x}")
    }
}

/// HTML-escape text for element content and quoted attributes.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '&' => o.push_str("&amp;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c if c.is_control() && c != '\n' && c != '\t' => o.push('\u{fffd}'),
            c => o.push(c),
        }
    }
    o
}

/// What the page needs from the pipeline file.
pub struct PipelineView {
    /// Stage names in pipeline order, kinds, declared outputs and edges.
    pub names: Vec<String>,
    pub kinds: BTreeMap<String, String>,
    pub outputs: BTreeMap<String, Vec<String>>,
    pub edges: Vec<(usize, usize)>,
}

impl PipelineView {
    pub fn from_pipeline(p: &crate::pipeline::Pipeline) -> PipelineView {
        let order: Vec<usize> = p.topo.clone();
        let pos: BTreeMap<usize, usize> = order.iter().enumerate().map(|(k, &i)| (i, k)).collect();
        let mut edges = Vec::new();
        for &i in &order {
            for d in p.downstream(i) {
                edges.push((pos[&i], pos[&d]));
            }
        }
        edges.sort();
        PipelineView {
            names: order.iter().map(|&i| p.stages[i].name.clone()).collect(),
            kinds: p.stages.iter().map(|s| (s.name.clone(), s.kind.name().to_string())).collect(),
            outputs: p.stages.iter().map(|s| (s.name.clone(), s.outs.iter().map(|o| o.path.clone()).collect())).collect(),
            edges,
        }
    }
}

fn fmt_num(v: f64) -> String {
    if v == 0.0 || (v.abs() >= 1e-3 && v.abs() < 1e6) { format!("{v:.4}").trim_end_matches('0').trim_end_matches('.').to_string() } else { format!("{v:.3e}") }
}

fn value_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

const CSS: &str = r#"
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;color:#1d2329;background:#f5f6f8}
header{background:#1d2b3a;color:#fff;padding:18px 28px}
header h1{margin:0 0 6px;font-size:22px}
header .meta{font-size:13px;opacity:.9}
main{padding:10px 28px 40px}
section{background:#fff;border:1px solid #dde1e6;border-radius:6px;margin:16px 0;padding:14px 18px}
h2{font-size:18px;margin:4px 0 12px}
h3{font-size:15px;margin:10px 0 8px}
table{border-collapse:collapse;font-size:13px}
th,td{border:1px solid #dde1e6;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eef1f4}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;color:#fff;font-size:12px}
.ok{background:#2e8b57}.warn{background:#c78a00}.fail{background:#c62828}.none{background:#7b8694}
.legend span{margin-right:14px;font-size:13px}
.legend i{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:-1px;border-radius:2px}
.card{border:1px solid #dde1e6;border-radius:6px;padding:10px 14px;margin:12px 0}
.charts{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
figure{margin:0}
.scroll{overflow-x:auto}
figure[data-chart=dag] svg{max-width:100%;height:auto}
.note{color:#5b6670;font-size:13px}
.error{color:#c62828;white-space:pre-wrap}
ul.reasons{margin:0;padding-left:18px}
"#;

/// Build the page for `rec`. `view` is the pipeline (None: it did not load,
/// with the reason); `layout` picks the DAG layout.
pub fn render(workspace: &Path, rec: &RunRecord, view: std::result::Result<PipelineView, String>, layout: Layout) -> Result<String> {
    rec.validate_timing(&format!("run record {}", rec.run_id))?;
    let colors = StatusColors;
    let by_name: BTreeMap<&str, &crate::engine::runs::StageRecord> = rec.stages.iter().map(|s| (s.stage.as_str(), s)).collect();
    let mut h = String::new();
    let status_class = match rec.status {
        RunStatus::Ok => "ok",
        RunStatus::Failed => "fail",
        RunStatus::Interrupted => "warn",
    };
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <meta name=\"generator\" content=\"dagrun {}\"><title>dagrun run {}</title><style>{CSS}</style></head><body>\n",
        env!("CARGO_PKG_VERSION"),
        esc(&rec.run_id)
    );
    let count = |s: Status| rec.stages.iter().filter(|x| x.status == s).count();
    let _ = write!(
        h,
        "<header><h1>Run {} <span class=\"badge {status_class}\">{}</span></h1><div class=\"meta\">pipeline <b>{}</b> · started {} · finished {} · {:.2} s · exit code {} · {} stages: {} ran, {} cached, {} restored, {} failed, {} skipped{}{}</div></header>\n<main>\n",
        esc(&rec.run_id),
        esc(rec.status.as_str()),
        esc(&rec.pipeline),
        esc(&rec.started_at),
        esc(&rec.finished_at),
        rec.seconds,
        rec.exit_code,
        rec.stages.len(),
        count(Status::Ran),
        count(Status::Cached),
        count(Status::Restored),
        count(Status::Failed),
        count(Status::Skipped),
        if rec.targets.is_empty() { String::new() } else { format!(" · targets {}", esc(&rec.targets.join(", "))) },
        if rec.forced.is_empty() { String::new() } else { format!(" · forced {}", esc(&rec.forced.join(", "))) },
    );
    let legend = {
        let mut l = String::from("<div class=\"legend\">");
        for s in [Status::Ran, Status::Cached, Status::Restored, Status::Failed, Status::Skipped] {
            let _ = write!(l, "<span><i style=\"background:{}\"></i>{}</span>", colors.hex(s), s.as_str());
        }
        l.push_str("</div>");
        l
    };

    // DAG
    h.push_str("<section id=\"dag\"><h2>Pipeline graph</h2>");
    h.push_str(&legend);
    let (names, edges, kinds, outputs, note) = match view {
        Ok(v) => (v.names, v.edges, v.kinds, v.outputs, None),
        Err(why) => (rec.stages.iter().map(|s| s.stage.clone()).collect(), vec![], BTreeMap::new(), BTreeMap::new(), Some(why)),
    };
    let statuses: Vec<Option<Status>> = names.iter().map(|n| by_name.get(n.as_str()).map(|s| s.status)).collect();
    let (svg, used) = dag::draw(&names, &statuses, &edges, layout, &colors)?;
    let _ = write!(
        h,
        "<figure class=\"chart scroll\" data-chart=\"dag\">{svg}</figure><p class=\"note\">Layout: {used}. White boxes: stages not selected in this run.</p>"
    );
    if let Some(why) = note {
        let _ = write!(h, "<p class=\"error\">The pipeline file does not load now, so edges are not drawn: {}</p>", esc(&why));
    }
    h.push_str("</section>\n");

    // Timeline
    h.push_str("<section id=\"timeline\"><h2>Timeline</h2>");
    let bars: Vec<charts::Bar> = rec
        .stages
        .iter()
        .filter_map(|s| Some(charts::Bar { stage: s.stage.clone(), status: s.status, worker: s.worker?, start: s.start_s?, end: s.end_s? }))
        .collect();
    if bars.is_empty() {
        h.push_str("<p class=\"note\">This run record has no stage start/end times (written by an older dagrun).</p>");
    } else {
        let workers = rec.jobs.unwrap_or(0).max(bars.iter().map(|b| b.worker.saturating_add(1)).max().unwrap_or(1));
        h.push_str(&legend);
        let _ = write!(h, "<figure class=\"chart scroll\" data-chart=\"timeline\">{}</figure>", charts::gantt(&bars, workers, rec.seconds, &colors)?);
        let _ = write!(
            h,
            "<p class=\"note\">One row per scheduler slot (<code>-j {workers}</code>); stages sharing a row ran one after another. Cached stages take almost no time.</p>"
        );
    }
    h.push_str("</section>\n");

    // Model cards
    let kind_of = |name: &str| kinds.get(name).cloned();
    let declared = |name: &str| outputs.get(name).and_then(|v| v.first().cloned());
    let cards = load::model_cards(workspace, rec, &kind_of);
    h.push_str("<section id=\"models\"><h2>Model cards</h2>");
    if cards.is_empty() {
        h.push_str("<p class=\"note\">No train stage in this run.</p>");
    }
    for c in &cards {
        model_card(&mut h, c)?;
    }
    h.push_str("</section>\n");

    // Drift
    h.push_str("<section id=\"drift\"><h2>Feature drift</h2>");
    let drift = load::drift_entries(workspace, rec, &kind_of, &declared);
    drift_section(&mut h, &drift);
    h.push_str("</section>\n");

    // Params
    h.push_str("<section id=\"params\"><h2>Params</h2>");
    if rec.params.is_empty() {
        h.push_str("<p class=\"note\">This run record has no params (written by an older dagrun, or the pipeline has none).</p>");
    } else {
        h.push_str("<table><tr><th>param</th><th>value</th></tr>");
        for (k, v) in &rec.params {
            let _ = write!(h, "<tr><td>{}</td><td>{}</td></tr>", esc(k), esc(&value_text(&crate::util::redact::param_value(v))));
        }
        h.push_str("</table>");
    }
    h.push_str("</section>\n");

    // Stages
    h.push_str("<section id=\"stages\"><h2>Stages and why they ran</h2><table><tr><th>stage</th><th>status</th><th>seconds</th><th>worker</th><th>reasons / error</th></tr>");
    for s in &rec.stages {
        let mut why = String::new();
        if !s.reasons.is_empty() {
            why.push_str("<ul class=\"reasons\">");
            for r in &s.reasons {
                let _ = write!(why, "<li>{}</li>", esc(r));
            }
            why.push_str("</ul>");
        }
        if let Some(e) = &s.error {
            let _ = write!(why, "<div class=\"error\">{}</div>", esc(e));
        }
        if s.outputs_changed == Some(false) {
            why.push_str("<div class=\"note\">outputs unchanged: dependents stay cached</div>");
        }
        if s.recorded == Some(false) {
            why.push_str("<div class=\"note\">not recorded or cached: the next run decides it again</div>");
        }
        let _ = write!(
            h,
            "<tr><td>{}</td><td><span class=\"badge\" style=\"background:{}\">{}</span></td><td class=\"num\">{:.3}</td><td class=\"num\">{}</td><td>{}</td></tr>",
            esc(&s.stage),
            colors.hex(s.status),
            s.status.as_str(),
            s.seconds,
            s.worker.map(|w| w.to_string()).unwrap_or_default(),
            why
        );
    }
    h.push_str("</table></section>\n</main></body></html>\n");
    Ok(h)
}

fn model_card(h: &mut String, c: &load::ModelCard) -> Result<()> {
    let _ = write!(
        h,
        "<div class=\"card\" data-tenant=\"{}\"><h3>{} <span class=\"note\">({}: {})</span></h3>",
        esc(&c.tenant),
        esc(&c.tenant),
        esc(&c.stage),
        c.status.as_str()
    );
    let (a, src) = match &c.model {
        Ok(x) => x,
        Err(why) => {
            let _ = write!(h, "<p class=\"error\">No model: {}</p></div>", esc(why));
            return Ok(());
        }
    };
    let m = &a.metrics;
    let lineage = |k: &str| a.lineage.get(k).map(value_text).unwrap_or_else(|| "n/a".into());
    let rows: Vec<(&str, String)> = vec![
        ("model version", a.model_version.clone()),
        (
            "champion",
            match &c.champion {
                Some(v) if *v == a.model_version => "yes".into(),
                Some(v) => format!("no (the champion is {v})"),
                None => "n/a (no model registry entry for this tenant)".into(),
            },
        ),
        ("test AUC", format!("{:.4}", m.auc)),
        ("log loss", format!("{:.4}", m.log_loss)),
        ("accuracy at 0.5", format!("{:.4}", m.accuracy)),
        ("rows: feature version / train / test", format!("{} / {} / {}", a.feature_stats.rows, m.rows_train, m.rows_test)),
        ("positives in test", format!("{} ({:.1} %)", m.positives_test, m.positive_rate * 100.0)),
        ("feature version", a.feature_set_version.clone()),
        ("feature file", format!("{} (blake3 {})", a.feature_file, a.feature_file_hash)),
        ("feature lineage hash", lineage("feature_lineage_hash")),
        ("model cache key", lineage("cache_key")),
        ("C", fmt_num(a.c)),
        ("read from", src.as_str().to_string()),
    ];
    h.push_str("<div class=\"charts\"><table>");
    for (k, v) in rows {
        let _ = write!(h, "<tr><th>{}</th><td>{}</td></tr>", esc(k), esc(&v));
    }
    h.push_str("</table>");
    match &c.evaluation {
        Ok(ev) => {
            let cm = &ev.confusion;
            let _ = write!(
                h,
                "<table class=\"confusion\"><tr><th colspan=\"3\">Confusion matrix at {} (test split)</th></tr>\
                 <tr><th></th><th>predicted 1</th><th>predicted 0</th></tr>\
                 <tr><th>actual 1</th><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>\
                 <tr><th>actual 0</th><td class=\"num\">{}</td><td class=\"num\">{}</td></tr></table>",
                cm.threshold, cm.true_positive, cm.false_negative, cm.false_positive, cm.true_negative
            );
            h.push_str("</div><div class=\"charts\">");
            let _ = write!(h, "<figure class=\"chart\" data-chart=\"roc\">{}</figure>", charts::roc(&ev.roc, ev.auc)?);
            let _ = write!(h, "<figure class=\"chart\" data-chart=\"calibration\">{}</figure>", charts::calibration(&ev.calibration)?);
        }
        Err(why) => {
            let _ = write!(h, "</div><p class=\"error\">No hold-out curves: {}</p><div class=\"charts\">", esc(why));
        }
    }
    let _ = write!(h, "<figure class=\"chart\" data-chart=\"coefficients\">{}</figure>", charts::coefficients(&a.feature_names, &a.coefficients)?);
    h.push_str("</div></div>");
    Ok(())
}

fn drift_section(h: &mut String, entries: &[load::DriftEntry]) {
    if entries.is_empty() {
        h.push_str("<p class=\"note\">No drift stage in this run (add a <code>uses: drift</code> stage; see the README).</p>");
        return;
    }
    h.push_str("<p class=\"note\">PSI over 10 quantile bins of the reference (the features the model was trained on); empty bins count as 0.0001. Below <i>warn_psi</i> ok, up to <i>max_psi</i> a warning, above it the stage fails.</p>");
    h.push_str(
        "<table><tr><th>tenant</th><th>feature</th><th>PSI</th><th>level</th><th>missing</th><th>out of range</th><th>reference</th><th>current rows</th></tr>",
    );
    for d in entries {
        match &d.report {
            Ok((r, src)) => {
                let Some(reference) = &r.reference else {
                    let _ = write!(
                        h,
                        "<tr><td>{}</td><td colspan=\"7\"><span class=\"badge none\">no reference</span> no model yet to compare with; the first model is trained on this data ({} rows)</td></tr>",
                        esc(&r.tenant),
                        r.current.rows
                    );
                    continue;
                };
                for f in &r.features {
                    let cls = match f.level {
                        Level::Ok => "ok",
                        Level::Warn => "warn",
                        Level::Fail => "fail",
                    };
                    let _ = write!(
                        h,
                        "<tr><td>{}</td><td>{}</td><td class=\"num\">{:.4}</td><td><span class=\"badge {cls}\">{}</span></td><td class=\"num\">{:.2} %</td><td class=\"num\">{:.2} %</td><td>model {} ({} rows, {}; thresholds {} / {})</td><td class=\"num\">{}</td></tr>",
                        esc(&r.tenant),
                        esc(&f.name),
                        f.psi,
                        f.level.as_str(),
                        f.missing_share * 100.0,
                        f.out_of_range_share * 100.0,
                        esc(&reference.model_version),
                        reference.rows,
                        esc(src.as_str()),
                        r.warn_psi,
                        r.max_psi,
                        r.current.rows
                    );
                }
            }
            Err(why) => {
                let _ = write!(
                    h,
                    "<tr><td>{}</td><td colspan=\"7\" class=\"error\">{} ({}): {}</td></tr>",
                    esc(&load::tenant_label(&d.stage)),
                    esc(&d.stage),
                    d.status.as_str(),
                    esc(why)
                );
            }
        }
    }
    h.push_str("</table>");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(esc("<script>alert('x')</script> & \"q\""), "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;");
        assert_eq!(esc("a\u{7}b"), "a\u{fffd}b");
    }
}
