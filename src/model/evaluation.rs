//! Hold-out evaluation curves for the model card (`dagrun report`): written
//! by `train` beside the model artifact as `…/model.eval.json`.
//!
//! Rules:
//! - Everything is computed from the real test-split predictions (the same
//!   scores as [`crate::model::metrics`]), never re-derived from summaries.
//! - Small and PII-free: no row, id or score is stored, only aggregates:
//!   the ROC curve thinned to at most [`MAX_ROC_POINTS`] points (first and
//!   last kept, then evenly spaced along the full curve), [`CALIBRATION_BINS`]
//!   equal-width calibration bins over [0, 1] (bin `k` holds `k/10 ≤ p <
//!   (k+1)/10`, the last bin includes 1; scikit-learn's `calibration_curve(…,
//!   strategy="uniform")`), and the confusion matrix at threshold 0.5 with
//!   `p > 0.5` predicting converted (as `LogisticRegression.predict`).
//! - Deterministic bytes (no timestamps) so the file hashes like any output.
//! - Read back strictly: [`Evaluation::from_json_bytes`] rejects unknown
//!   formats, unknown fields, out-of-range or non-finite values.

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

/// Format identifier of the file.
pub const FORMAT: &str = "dagrun-model-eval/1";
/// Upper bound on stored ROC points.
pub const MAX_ROC_POINTS: usize = 200;
/// Number of equal-width calibration bins.
pub const CALIBRATION_BINS: usize = 10;

/// Confusion matrix at threshold 0.5 (`p > 0.5` predicts converted).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Confusion {
    pub threshold: f64,
    pub true_positive: u64,
    pub false_positive: u64,
    pub true_negative: u64,
    pub false_negative: u64,
}

/// One calibration bin; `mean_predicted`/`fraction_positive` are absent when empty.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CalibrationBin {
    pub lower: f64,
    pub upper: f64,
    pub count: u64,
    pub mean_predicted: Option<f64>,
    pub fraction_positive: Option<f64>,
}

/// The hold-out evaluation of one model.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Evaluation {
    pub format: String,
    pub tenant: String,
    pub model_version: String,
    pub rows_test: u64,
    pub positives_test: u64,
    pub auc: f64,
    /// `[false positive rate, true positive rate]`, from (0,0) to (1,1).
    pub roc: Vec<[f64; 2]>,
    pub calibration: Vec<CalibrationBin>,
    pub confusion: Confusion,
}

/// The full ROC curve: one point per distinct score (ties grouped), from
/// (0,0) to (1,1). Empty when a class is missing or lengths differ.
pub fn roc_curve(y: &[bool], p: &[f64]) -> Vec<[f64; 2]> {
    let n_pos = y.iter().filter(|&&v| v).count();
    let n_neg = y.len() - n_pos;
    if y.len() != p.len() || n_pos == 0 || n_neg == 0 || p.iter().any(|v| v.is_nan()) {
        return vec![];
    }
    let mut idx: Vec<usize> = (0..p.len()).collect();
    idx.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
    let mut pts = vec![[0.0, 0.0]];
    let (mut tp, mut fp) = (0usize, 0usize);
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j < idx.len() && p[idx[j]] == p[idx[i]] {
            if y[idx[j]] {
                tp += 1;
            } else {
                fp += 1;
            }
            j += 1;
        }
        pts.push([fp as f64 / n_neg as f64, tp as f64 / n_pos as f64]);
        i = j;
    }
    pts
}

/// At most `max` points of `pts` (max ≥ 2): the first, the last, and evenly
/// spaced ones between, in order.
pub fn thin(pts: &[[f64; 2]], max: usize) -> Vec<[f64; 2]> {
    let max = max.max(2);
    if pts.len() <= max {
        return pts.to_vec();
    }
    let last = pts.len() - 1;
    let mut out: Vec<[f64; 2]> = (0..max).map(|k| pts[(k * last + (max - 1) / 2) / (max - 1)]).collect();
    out[0] = pts[0];
    out[max - 1] = pts[last];
    out.dedup();
    out
}

/// [`CALIBRATION_BINS`] equal-width bins over [0, 1].
pub fn calibration(y: &[bool], p: &[f64]) -> Vec<CalibrationBin> {
    let b = CALIBRATION_BINS;
    let mut count = vec![0u64; b];
    let mut sum_p = vec![0.0f64; b];
    let mut pos = vec![0u64; b];
    for (&t, &q) in y.iter().zip(p) {
        if !q.is_finite() {
            continue;
        }
        let k = ((q.clamp(0.0, 1.0) * b as f64) as usize).min(b - 1);
        count[k] += 1;
        sum_p[k] += q;
        pos[k] += t as u64;
    }
    (0..b)
        .map(|k| CalibrationBin {
            lower: k as f64 / b as f64,
            upper: (k + 1) as f64 / b as f64,
            count: count[k],
            mean_predicted: (count[k] > 0).then(|| sum_p[k] / count[k] as f64),
            fraction_positive: (count[k] > 0).then(|| pos[k] as f64 / count[k] as f64),
        })
        .collect()
}

/// The confusion matrix at 0.5.
pub fn confusion(y: &[bool], p: &[f64]) -> Confusion {
    let mut c = Confusion { threshold: 0.5, true_positive: 0, false_positive: 0, true_negative: 0, false_negative: 0 };
    for (&t, &q) in y.iter().zip(p) {
        match (q > 0.5, t) {
            (true, true) => c.true_positive += 1,
            (true, false) => c.false_positive += 1,
            (false, false) => c.true_negative += 1,
            (false, true) => c.false_negative += 1,
        }
    }
    c
}

impl Evaluation {
    /// Build from the test split's labels and scores.
    pub fn compute(tenant: &str, model_version: &str, y: &[bool], p: &[f64]) -> Evaluation {
        Evaluation {
            format: FORMAT.into(),
            tenant: tenant.into(),
            model_version: model_version.into(),
            rows_test: y.len() as u64,
            positives_test: y.iter().filter(|&&v| v).count() as u64,
            auc: crate::model::metrics::roc_auc(y, p),
            roc: thin(&roc_curve(y, p), MAX_ROC_POINTS),
            calibration: calibration(y, p),
            confusion: confusion(y, p),
        }
    }

    pub fn to_json_bytes(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(self).expect("serialising Evaluation to JSON cannot fail");
        out.push(b'\n');
        out
    }

    /// Parse and check; `origin` is named in every error.
    pub fn from_json_bytes(bytes: &[u8], origin: &str) -> Result<Evaluation> {
        // The parse error without the values it would quote.
        let e: Evaluation = match crate::util::redact::from_json(bytes) {
            Ok(e) => e,
            Err(err) => bail!("{origin}: not a valid {FORMAT} evaluation file: {err}"),
        };
        e.validate(origin)?;
        Ok(e)
    }

    pub fn validate(&self, origin: &str) -> Result<()> {
        if self.format != FORMAT {
            bail!("{origin}: unsupported evaluation format {:?} (expected {FORMAT:?})", self.format);
        }
        let unit = |v: f64| v.is_finite() && (0.0..=1.0).contains(&v);
        if !unit(self.auc) {
            bail!("{origin}: auc {} is not in [0, 1]", self.auc);
        }
        if self.roc.len() < 2 || self.roc.len() > MAX_ROC_POINTS || self.roc.iter().flatten().any(|&v| !unit(v)) {
            bail!("{origin}: roc must hold 2..={MAX_ROC_POINTS} points with coordinates in [0, 1]");
        }
        if self.roc.windows(2).any(|w| w[1][0] < w[0][0] || w[1][1] < w[0][1]) {
            bail!("{origin}: roc points must not decrease");
        }
        if self.calibration.len() != CALIBRATION_BINS {
            bail!("{origin}: calibration must hold {CALIBRATION_BINS} bins, not {}", self.calibration.len());
        }
        let mut n = 0u64;
        for (k, b) in self.calibration.iter().enumerate() {
            let filled = b.mean_predicted.is_some() && b.fraction_positive.is_some();
            let vals_ok = [b.mean_predicted, b.fraction_positive].iter().flatten().all(|&v| unit(v));
            if !unit(b.lower) || !unit(b.upper) || b.lower >= b.upper || !vals_ok || filled != (b.count > 0) {
                bail!("{origin}: calibration bin {k} is inconsistent");
            }
            n += b.count;
        }
        let c = &self.confusion;
        let total = c.true_positive + c.false_positive + c.true_negative + c.false_negative;
        if n != self.rows_test || total != self.rows_test || c.true_positive + c.false_negative != self.positives_test {
            bail!("{origin}: counts disagree: {} test rows, {n} in calibration bins, {total} in the confusion matrix", self.rows_test);
        }
        Ok(())
    }
}

/// Where `train` writes the evaluation of the model at `model_output`:
/// `X.json` → `X.eval.json` (else `X` + `.eval.json`).
pub fn path_for(model_output: &str) -> String {
    match model_output.strip_suffix(".json") {
        Some(stem) => format!("{stem}.eval.json"),
        None => format!("{model_output}.eval.json"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roc_curve_matches_hand_computation() {
        // sklearn.metrics.roc_curve([0,0,1,1],[.1,.4,.35,.8]) -> fpr [0,0,.5,.5,1], tpr [0,.5,.5,1,1]
        let pts = roc_curve(&[false, false, true, true], &[0.1, 0.4, 0.35, 0.8]);
        assert_eq!(pts, vec![[0.0, 0.0], [0.0, 0.5], [0.5, 0.5], [0.5, 1.0], [1.0, 1.0]]);
        // ties are one step
        let pts = roc_curve(&[true, false, true], &[0.3, 0.3, 0.3]);
        assert_eq!(pts, vec![[0.0, 0.0], [1.0, 1.0]]);
        assert!(roc_curve(&[true, true], &[0.1, 0.2]).is_empty());
    }

    #[test]
    fn thinning_keeps_ends_and_order() {
        let pts: Vec<[f64; 2]> = (0..=1000).map(|i| [i as f64 / 1000.0, (i as f64 / 1000.0).sqrt()]).collect();
        let t = thin(&pts, MAX_ROC_POINTS);
        assert_eq!(t.len(), MAX_ROC_POINTS);
        assert_eq!(t[0], [0.0, 0.0]);
        assert_eq!(*t.last().unwrap(), [1.0, 1.0]);
        assert!(t.windows(2).all(|w| w[1][0] > w[0][0]));
        assert_eq!(thin(&pts[..5], 200), pts[..5].to_vec());
    }

    #[test]
    fn calibration_and_confusion_hand_computed() {
        let y = [true, false, false, true, true];
        let p = [0.05, 0.08, 0.55, 0.95, 1.0];
        let c = calibration(&y, &p);
        assert_eq!(c.len(), 10);
        assert_eq!(c[0].count, 2);
        assert_eq!(c[0].fraction_positive, Some(0.5));
        assert!((c[0].mean_predicted.unwrap() - 0.065).abs() < 1e-12);
        assert_eq!(c[5].count, 1);
        assert_eq!(c[9].count, 2); // 1.0 falls in the last bin
        assert_eq!(c[3].mean_predicted, None);
        let m = confusion(&y, &p);
        assert_eq!((m.true_positive, m.false_positive, m.true_negative, m.false_negative), (2, 1, 1, 1));
    }

    #[test]
    fn round_trip_and_strict_parsing() {
        let y: Vec<bool> = (0..500).map(|i| (i * 7919) % 11 < 4).collect();
        let p: Vec<f64> = (0..500).map(|i| ((i * 104729) % 997) as f64 / 996.0).collect();
        let e = Evaluation::compute("T", "T-abc", &y, &p);
        let b = e.to_json_bytes();
        assert_eq!(Evaluation::from_json_bytes(&b, "m.eval.json").unwrap(), e);
        assert!(e.roc.len() <= MAX_ROC_POINTS);
        let mut bad = e.clone();
        bad.confusion.true_positive += 1;
        assert!(Evaluation::from_json_bytes(&bad.to_json_bytes(), "x").unwrap_err().to_string().contains("counts disagree"));
        let mut bad = e.clone();
        bad.roc[1] = [2.0, 0.0];
        assert!(Evaluation::from_json_bytes(&bad.to_json_bytes(), "x").is_err());
        let text = String::from_utf8(b).unwrap().replacen("\"format\"", "\"extra\": 1, \"format\"", 1);
        assert!(Evaluation::from_json_bytes(text.as_bytes(), "x.json").unwrap_err().to_string().contains("x.json"));
        assert_eq!(path_for("models/A/model.json"), "models/A/model.eval.json");
        assert_eq!(path_for("models/A/model"), "models/A/model.eval.json");
    }
}
