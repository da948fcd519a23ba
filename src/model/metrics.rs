//! Hold-out metrics (spec §7), matching scikit-learn's definitions.

use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Metrics {
    pub auc: f64,
    pub log_loss: f64,
    pub accuracy: f64,
    /// Fraction of test labels that are `true`.
    pub positive_rate: f64,
    pub rows_train: u64,
    pub rows_test: u64,
    pub positives_test: u64,
}

/// Exact ROC AUC with tied scores averaged (Mann–Whitney U with mid-ranks),
/// equal to `sklearn.metrics.roc_auc_score(y, p)`.
///
/// Returns NaN when AUC is undefined or the input is invalid: only one class
/// in `y` (scikit-learn raises/warns there), empty input, length mismatch,
/// or a NaN score.
pub fn roc_auc(y: &[bool], p: &[f64]) -> f64 {
    let n = y.len();
    if n == 0 || p.len() != n || p.iter().any(|v| v.is_nan()) {
        return f64::NAN;
    }
    let n_pos = y.iter().filter(|&&v| v).count();
    let n_neg = n - n_pos;
    if n_pos == 0 || n_neg == 0 {
        return f64::NAN;
    }
    let mut idx: Vec<usize> = (0..n).collect();
    idx.sort_by(|&a, &b| p[a].total_cmp(&p[b]));
    // sum of (1-based, tie-averaged) ranks of the positives
    let mut rank_sum_pos = 0.0f64;
    let mut i = 0;
    while i < n {
        let mut j = i + 1;
        while j < n && p[idx[j]] == p[idx[i]] {
            j += 1;
        }
        // ranks i+1 ..= j, average (i + 1 + j) / 2
        let avg = (i + 1 + j) as f64 / 2.0;
        let pos_in_group = idx[i..j].iter().filter(|&&k| y[k]).count();
        rank_sum_pos += avg * pos_in_group as f64;
        i = j;
    }
    let np = n_pos as f64;
    (rank_sum_pos - np * (np + 1.0) / 2.0) / (np * n_neg as f64)
}

/// Clipping of [`log_loss`]: scikit-learn ≥ 1.5 clips to
/// `[eps, 1 - eps]` with `eps = np.finfo(float64).eps` (it was 1e-15 before 1.2/1.5).
pub const LOG_LOSS_EPS: f64 = f64::EPSILON;

/// Mean binary log loss, `sklearn.metrics.log_loss(y, p)` with `p` clipped to
/// `[LOG_LOSS_EPS, 1 - LOG_LOSS_EPS]`. Unlike scikit-learn it is defined for
/// a single-class `y`. NaN for empty input or a length mismatch.
pub fn log_loss(y: &[bool], p: &[f64]) -> f64 {
    if y.is_empty() || p.len() != y.len() {
        return f64::NAN;
    }
    let s: f64 = y
        .iter()
        .zip(p)
        .map(|(&t, &q)| {
            let q = q.clamp(LOG_LOSS_EPS, 1.0 - LOG_LOSS_EPS);
            -(if t { q.ln() } else { (1.0 - q).ln() })
        })
        .sum();
    s / y.len() as f64
}

/// Accuracy at threshold 0.5 with `p > 0.5` predicting `true`, as
/// scikit-learn's `LogisticRegression.predict` (decision_function > 0).
/// NaN for empty input or a length mismatch.
pub fn accuracy(y: &[bool], p: &[f64]) -> f64 {
    if y.is_empty() || p.len() != y.len() {
        return f64::NAN;
    }
    let ok = y.iter().zip(p).filter(|&(&t, &q)| (q > 0.5) == t).count();
    ok as f64 / y.len() as f64
}

/// Fraction of labels that are `true` (NaN when empty).
pub fn positive_rate(y: &[bool]) -> f64 {
    if y.is_empty() {
        return f64::NAN;
    }
    y.iter().filter(|&&v| v).count() as f64 / y.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_hand_computed() {
        // sklearn's docstring example: 0.75
        assert_eq!(roc_auc(&[false, false, true, true], &[0.1, 0.4, 0.35, 0.8]), 0.75);
        // ties across classes count 1/2: pairs (pos,neg): (0.5,0.5)=.5, (0.5,0.2)=1,
        // (0.9,0.5)=1, (0.9,0.2)=1 -> 3.5/4
        assert_eq!(roc_auc(&[false, true, false, true], &[0.5, 0.5, 0.2, 0.9]), 0.875);
        // all tied -> 0.5
        assert_eq!(roc_auc(&[true, false, true], &[0.3, 0.3, 0.3]), 0.5);
        // perfect and reversed
        assert_eq!(roc_auc(&[false, true], &[0.1, 0.9]), 1.0);
        assert_eq!(roc_auc(&[false, true], &[0.9, 0.1]), 0.0);
        // undefined
        assert!(roc_auc(&[true, true], &[0.1, 0.2]).is_nan());
        assert!(roc_auc(&[], &[]).is_nan());
        assert!(roc_auc(&[true, false], &[0.1]).is_nan());
        assert!(roc_auc(&[true, false], &[0.1, f64::NAN]).is_nan());
    }

    #[test]
    fn auc_matches_pairwise_definition() {
        // brute force over all pairs on a pseudo-random set with many ties
        let y: Vec<bool> = (0..200).map(|i| (i * 7919) % 13 < 5).collect();
        let p: Vec<f64> = (0..200).map(|i| ((i * 104729) % 17) as f64 / 16.0).collect();
        let (mut num, mut den) = (0.0, 0.0);
        for i in 0..200 {
            for j in 0..200 {
                if y[i] && !y[j] {
                    den += 1.0;
                    num += if p[i] > p[j] {
                        1.0
                    } else if p[i] == p[j] {
                        0.5
                    } else {
                        0.0
                    };
                }
            }
        }
        assert!((roc_auc(&y, &p) - num / den).abs() < 1e-15);
    }

    #[test]
    fn log_loss_and_accuracy_hand_computed() {
        // sklearn docstring: log_loss([1,0,0,1], [.9,.1,.2,.65]) = 0.21616...
        let y = [true, false, false, true];
        let p = [0.9, 0.1, 0.2, 0.65];
        let expect = -(0.9f64.ln() + 0.9f64.ln() + 0.8f64.ln() + 0.65f64.ln()) / 4.0;
        assert!((log_loss(&y, &p) - expect).abs() < 1e-15);
        assert!((log_loss(&y, &p) - 0.21616).abs() < 1e-5);
        // clipping: p = 0 for a positive -> -ln(eps)
        assert!((log_loss(&[true], &[0.0]) + f64::EPSILON.ln()).abs() < 1e-12);
        assert!(log_loss(&[true], &[1.0]) < 1e-15);
        // accuracy: threshold is strict, p = 0.5 predicts false
        assert_eq!(accuracy(&y, &p), 1.0);
        assert_eq!(accuracy(&[true, false, true, false], &[0.5, 0.5, 0.51, 0.49]), 0.75);
        assert_eq!(positive_rate(&[true, false, false, false]), 0.25);
        assert!(accuracy(&[], &[]).is_nan() && log_loss(&[true], &[]).is_nan());
    }
}
