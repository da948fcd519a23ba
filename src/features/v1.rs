//! Feature set `v1.0` (spec §4), and the generating label model of spec §5.
//!
//! Two steps, kept apart so that serving never refits:
//! - [`fit`]: tenant statistics over the tenant's training rows;
//! - [`transform`]: per-row features from one raw row and *stored* statistics.
//!
//! ## Changing this file: the version rule
//! These formulas feed the cache keys of every stage kind that calls them
//! (`afe`, `store`, `train`, `serve-check`, and `generate` through the label
//! model). A change is one of two kinds, never silent:
//! - **Different numbers for the same rows** (a formula, a constant, the order
//!   of a floating-point sum): that is a new feature set. Add `v2.rs` with
//!   `VERSION = "v2.0"` beside this file and list it in `KNOWN_VERSIONS`; never
//!   edit v1 in place, since stored feature versions and models trained on them
//!   name `v1.0` and serving must keep reproducing them.
//! - **Same numbers, different code** (speed, structure): no version change,
//!   and the unit tests below (hand-computed values and pandas' values) must pass
//!   unchanged.
//!
//! A stage kind whose *own* code writes different bytes for the same inputs
//! bumps its `StageKind::version` (part of every cache key of the kind, see
//! `engine/fingerprint.rs`); the pinned cache-key test in `tests/it/cache.rs`
//! then fails until its expected key is updated on purpose.

use serde::{Deserialize, Serialize};

/// Feature set version string as written in manifests, footers and models.
pub const VERSION: &str = "v1.0";

/// The five features, in model column order.
pub const FEATURE_NAMES: [&str; 5] = ["Recency_Days", "Frequency_Ratio", "High_Value_Segment", "Purchase_Login_Ratio", "Activity_Score"];

/// Fitted per-tenant statistics (stored with the feature version).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TenantStats {
    /// Arithmetic mean of `Login_Count`.
    pub mean_login: f64,
    /// 0.8 quantile of `Purchase_Amount`, linear interpolation (numpy default).
    pub p80_purchase: f64,
    /// Rows the statistics were fitted on.
    pub rows: u64,
}

/// One row's features.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Features {
    pub recency_days: i64,
    pub frequency_ratio: f64,
    pub high_value_segment: i64,
    pub purchase_login_ratio: f64,
    pub activity_score: f64,
}

impl Features {
    /// The features as the model's input vector, in [`FEATURE_NAMES`] order.
    pub fn as_array(&self) -> [f64; 5] {
        [self.recency_days as f64, self.frequency_ratio, self.high_value_segment as f64, self.purchase_login_ratio, self.activity_score]
    }
}

/// Quantile `q` of ascending-sorted `sorted` with linear interpolation:
/// h = (n-1)q, x[floor h] + (h - floor h)(x[floor h + 1] - x[floor h]).
/// Returns 0.0 for an empty slice.
pub fn quantile_linear(sorted: &[f64], q: f64) -> f64 {
    let n = sorted.len();
    if n == 0 {
        return 0.0;
    }
    let h = (n - 1) as f64 * q;
    let lo = h.floor() as usize;
    if lo + 1 >= n {
        return sorted[n - 1];
    }
    sorted[lo] + (h - lo as f64) * (sorted[lo + 1] - sorted[lo])
}

/// [`quantile_linear`] of `values` without sorting them: the two order
/// statistics it needs, x[⌊h⌋] and x[⌊h⌋+1] (ascending by `total_cmp`, as
/// the sort was), are found by selection in O(n), and `values` is left
/// reordered (partitioned around x[⌊h⌋]). Same result, bit for bit, as
/// sorting then [`quantile_linear`]: an order statistic does not depend on
/// how it is found.
pub fn quantile_linear_select(values: &mut [f64], q: f64) -> f64 {
    let n = values.len();
    if n == 0 {
        return 0.0;
    }
    let h = (n - 1) as f64 * q;
    let lo = h.floor() as usize;
    if lo + 1 >= n {
        return *values.iter().max_by(|a, b| a.total_cmp(b)).expect("non-empty");
    }
    let (_, x_lo, above) = values.select_nth_unstable_by(lo, |a, b| a.total_cmp(b));
    let x_lo = *x_lo;
    // Everything above index ⌊h⌋ is ≥ x[⌊h⌋]: x[⌊h⌋+1] is its minimum.
    let x_hi = *above.iter().min_by(|a, b| a.total_cmp(b)).expect("lo + 1 < n");
    x_lo + (h - lo as f64) * (x_hi - x_lo)
}

/// Fit the tenant statistics. `purchases` is reordered in place (the quantile
/// needs the whole column: this is one of the places that holds a column in memory).
pub fn fit(logins: &[i64], purchases: &mut [f64]) -> TenantStats {
    let rows = logins.len() as u64;
    let mean_login = if logins.is_empty() {
        0.0
    } else {
        // Exact integer sum, then one division: order-independent.
        let sum: i128 = logins.iter().map(|&v| v as i128).sum();
        sum as f64 / logins.len() as f64
    };
    TenantStats { mean_login, p80_purchase: quantile_linear_select(purchases, 0.8), rows }
}

/// Features of one raw row, given stored statistics.
/// `last_visit` and `as_of` are days since 1970-01-01 (Arrow date32).
#[inline]
pub fn transform(stats: &TenantStats, as_of: i32, login_count: i64, purchase_amount: f64, last_visit: i32) -> Features {
    let recency_days = as_of as i64 - last_visit as i64;
    let frequency_ratio = if stats.mean_login == 0.0 { 0.0 } else { login_count as f64 / stats.mean_login };
    let high_value_segment = i64::from(purchase_amount > stats.p80_purchase);
    let purchase_login_ratio = purchase_amount / (login_count.max(1) as f64);
    let activity_score = frequency_ratio * (-(recency_days as f64) / 90.0).exp();
    Features { recency_days, frequency_ratio, high_value_segment, purchase_login_ratio, activity_score }
}

/// Generating coefficients of spec §5, in [`FEATURE_NAMES`] order.
pub const LABEL_COEFFICIENTS: [f64; 5] = [-0.01, 0.8, 1.5, 0.002, 0.5];
/// Generating intercept of spec §5.
pub const LABEL_INTERCEPT: f64 = -0.5;

/// z of spec §5 for one row's features.
pub fn label_logit(f: &Features) -> f64 {
    let x = f.as_array();
    LABEL_INTERCEPT + x.iter().zip(LABEL_COEFFICIENTS).map(|(a, b)| a * b).sum::<f64>()
}

/// The logistic function.
#[inline]
pub fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_matches_numpy_linear() {
        // numpy.quantile([1,2,3,4,5], 0.8) == 4.2
        assert!((quantile_linear(&[1.0, 2.0, 3.0, 4.0, 5.0], 0.8) - 4.2).abs() < 1e-12);
        // numpy.quantile([10, 20], 0.8) == 18.0
        assert!((quantile_linear(&[10.0, 20.0], 0.8) - 18.0).abs() < 1e-12);
        // one element, and (n-1)*0.8 integral: n = 6 -> h = 4.0
        assert_eq!(quantile_linear(&[7.5], 0.8), 7.5);
        assert_eq!(quantile_linear(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0], 0.8), 4.0);
        assert_eq!(quantile_linear(&[], 0.8), 0.0);
    }

    #[test]
    fn selection_quantile_equals_sorted_quantile_bitwise() {
        use rand::rngs::ChaCha8Rng;
        use rand::{RngExt, SeedableRng};
        let mut rng = ChaCha8Rng::seed_from_u64(80);
        for n in [1usize, 2, 3, 5, 6, 7, 10, 11, 100, 1001, 20_000] {
            for dup in [false, true] {
                // cents, with many ties when `dup`; a -0.0 and a 0.0 among them
                let mut v: Vec<f64> = (0..n).map(|_| if dup { rng.random_range(0..20) as f64 } else { (rng.random::<f64>() * 1e6).round() / 100.0 }).collect();
                if n > 3 {
                    v[1] = -0.0;
                    v[2] = 0.0;
                }
                let mut sorted = v.clone();
                sorted.sort_unstable_by(|a, b| a.total_cmp(b));
                for q in [0.0, 0.25, 0.5, 0.8, 0.99, 1.0] {
                    let mut w = v.clone();
                    assert_eq!(quantile_linear_select(&mut w, q).to_bits(), quantile_linear(&sorted, q).to_bits(), "n {n} q {q} dup {dup}");
                }
            }
        }
        assert_eq!(quantile_linear_select(&mut [], 0.8), 0.0);
    }

    #[test]
    fn fit_sorts_and_averages() {
        let mut p = vec![5.0, 1.0, 4.0, 2.0, 3.0];
        let s = fit(&[1, 2, 3, 4], &mut p);
        assert_eq!(s.mean_login, 2.5);
        assert!((s.p80_purchase - 4.2).abs() < 1e-12);
        assert_eq!(s.rows, 4);
    }

    #[test]
    fn hand_computed_row() {
        let stats = TenantStats { mean_login: 10.0, p80_purchase: 100.0, rows: 3 };
        // as_of day 100, last visit day 10 -> recency 90
        let f = transform(&stats, 100, 20, 150.0, 10);
        assert_eq!(f.recency_days, 90);
        assert_eq!(f.frequency_ratio, 2.0);
        assert_eq!(f.high_value_segment, 1);
        assert_eq!(f.purchase_login_ratio, 7.5);
        assert!((f.activity_score - 2.0 * (-1.0f64).exp()).abs() < 1e-15);
        // equal to p80 is not "greater than"
        assert_eq!(transform(&stats, 100, 20, 100.0, 10).high_value_segment, 0);
    }

    #[test]
    fn zero_logins_and_zero_mean() {
        let stats = TenantStats { mean_login: 0.0, p80_purchase: 0.0, rows: 2 };
        let f = transform(&stats, 5, 0, 12.5, 5);
        assert_eq!(f.frequency_ratio, 0.0);
        assert_eq!(f.activity_score, 0.0);
        assert_eq!(f.recency_days, 0);
        // max(Login_Count, 1)
        assert_eq!(f.purchase_login_ratio, 12.5);
    }

    #[test]
    fn label_logit_matches_spec() {
        let f = Features { recency_days: 10, frequency_ratio: 1.0, high_value_segment: 1, purchase_login_ratio: 50.0, activity_score: 0.5 };
        let z = -0.5 + 1.5 * 1.0 + 0.8 * 1.0 - 0.01 * 10.0 + 0.002 * 50.0 + 0.5 * 0.5;
        assert!((label_logit(&f) - z).abs() < 1e-15);
        assert!((sigmoid(0.0) - 0.5).abs() < 1e-15);
        assert!(sigmoid(-800.0) >= 0.0 && sigmoid(800.0) <= 1.0);
    }
}
