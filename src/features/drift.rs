//! Feature drift: the population stability index (PSI) of a current sample
//! against a reference sample, and the share of missing or out-of-range
//! values. Used by the `drift` stage kind; the formula lives only here.
//!
//! Rules (the README's "Drift monitoring" section repeats them):
//! - **Bins** are [`BINS`] quantile bins of the *reference*. The inner edges
//!   are the reference's k/10 quantiles, k = 1..9, by the inverted-CDF
//!   definition (the smallest value `x` with `F(x) ≥ k/10`, i.e.
//!   `sorted[ceil(k·n/10) − 1]`; numpy's `method="inverted_cdf"`). Bins are
//!   right-closed: bin 0 = `(−∞, e₁]`, bin i = `(eᵢ, eᵢ₊₁]`, the last =
//!   `(e₉, +∞)`, so the outer bins are open and every finite value lands in a
//!   bin.
//! - **Ties / duplicate edges**: equal edges (a value that fills more than a
//!   tenth of the reference, e.g. a 0/1 feature or a small count) are merged,
//!   so such a feature gets fewer than 10 bins; a tied value always falls
//!   wholly in one bin. A constant reference gives 2 bins: `≤ c` and `> c`.
//! - **Shares** are over the non-missing values of each sample.
//!   `PSI = Σᵢ (cᵢ − rᵢ) · ln(cᵢ / rᵢ)` where `rᵢ`, `cᵢ` are the reference
//!   and current shares of bin i, each first raised to at least
//!   [`EPSILON`] = 1e-4 (so an empty bin counts as 0.01 % instead of making
//!   the logarithm infinite; shares are not renormalised afterwards).
//! - **Missing** = NaN (the feature store has no nulls; a reader that sees a
//!   null passes NaN). **Out of range** = finite and below the reference's
//!   minimum or above its maximum (±∞ included). Both shares are over all
//!   current rows. Out-of-range values are still binned (in the outer bins).
//! - **Thresholds**: PSI > `max_psi` (default [`DEFAULT_MAX_PSI`] = 0.25)
//!   fails; `warn_psi` (default [`DEFAULT_WARN_PSI`] = 0.1) ≤ PSI ≤ `max_psi`
//!   warns; below is ok (the conventional reading: < 0.1 no significant
//!   shift, 0.1–0.25 moderate, > 0.25 major).

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

/// Number of quantile bins of the reference (before merging duplicate edges).
pub const BINS: usize = 10;
/// Floor for a bin's share in the PSI sum.
pub const EPSILON: f64 = 1e-4;
/// Default gate: fail above this PSI.
pub const DEFAULT_MAX_PSI: f64 = 0.25;
/// Default warning level.
pub const DEFAULT_WARN_PSI: f64 = 0.1;

/// ok / warn / fail for one feature or a whole report.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

impl Level {
    pub fn of(psi: f64, warn_psi: f64, max_psi: f64) -> Level {
        if psi > max_psi {
            Level::Fail
        } else if psi >= warn_psi {
            Level::Warn
        } else {
            Level::Ok
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warn => "warn",
            Level::Fail => "fail",
        }
    }
}

/// One bin of a feature's comparison.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BinShare {
    /// Upper edge (inclusive); `None` for the last, open bin.
    pub upper: Option<f64>,
    pub reference: f64,
    pub current: f64,
}

/// The comparison of one feature.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FeatureDrift {
    pub name: String,
    pub psi: f64,
    pub level: Level,
    pub missing_share: f64,
    pub out_of_range_share: f64,
    pub reference_min: f64,
    pub reference_max: f64,
    pub bins: Vec<BinShare>,
}

/// The inner edges (sorted, duplicates merged) of the reference's quantile
/// bins. `sorted` holds the reference's finite values in ascending order.
pub fn quantile_edges(sorted: &[f64]) -> Vec<f64> {
    let n = sorted.len();
    if n == 0 {
        return vec![];
    }
    let mut edges: Vec<f64> = (1..BINS).map(|k| sorted[(k * n).div_ceil(BINS) - 1]).collect();
    edges.dedup();
    edges
}

/// Index of the right-closed bin holding `x` given sorted inner edges.
pub fn bin_of(edges: &[f64], x: f64) -> usize {
    edges.partition_point(|&e| e < x)
}

/// PSI of two share vectors, each share floored at [`EPSILON`].
pub fn psi(reference: &[f64], current: &[f64]) -> f64 {
    reference
        .iter()
        .zip(current)
        .map(|(&r, &c)| {
            let (r, c) = (r.max(EPSILON), c.max(EPSILON));
            (c - r) * (c / r).ln()
        })
        .sum()
}

fn shares(edges: &[f64], values: impl Iterator<Item = f64>) -> (Vec<f64>, usize) {
    let mut counts = vec![0usize; edges.len() + 1];
    let mut n = 0;
    for v in values.filter(|v| !v.is_nan()) {
        counts[bin_of(edges, v)] += 1;
        n += 1;
    }
    (counts.iter().map(|&c| if n == 0 { 0.0 } else { c as f64 / n as f64 }).collect(), n)
}

/// Compare one feature. Errors when the reference has no finite value or the
/// current sample has no non-missing value (PSI is undefined).
pub fn compare(name: &str, reference: &[f64], current: &[f64], warn_psi: f64, max_psi: f64) -> Result<FeatureDrift> {
    let mut sorted: Vec<f64> = reference.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        bail!("feature {name}: the reference has no finite values: PSI is undefined");
    }
    sorted.sort_by(f64::total_cmp);
    let (lo, hi) = (sorted[0], sorted[sorted.len() - 1]);
    let edges = quantile_edges(&sorted);
    let (r, _) = shares(&edges, sorted.iter().copied());
    let (c, n_cur) = shares(&edges, current.iter().copied());
    if n_cur == 0 {
        bail!("feature {name}: the current data has no non-missing values: PSI is undefined");
    }
    let total = current.len() as f64;
    let missing = current.iter().filter(|v| v.is_nan()).count() as f64 / total;
    let out = current.iter().filter(|v| !v.is_nan() && (**v < lo || **v > hi)).count() as f64 / total;
    let value = psi(&r, &c);
    let bins = (0..r.len()).map(|i| BinShare { upper: edges.get(i).copied(), reference: r[i], current: c[i] }).collect();
    Ok(FeatureDrift {
        name: name.into(),
        psi: value,
        level: Level::of(value, warn_psi, max_psi),
        missing_share: missing,
        out_of_range_share: out,
        reference_min: lo,
        reference_max: hi,
        bins,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic standard normals (Box–Muller on a ChaCha stream).
    fn normals(n: usize, seed: u64, mean: f64, sd: f64) -> Vec<f64> {
        use rand::rngs::ChaCha8Rng;
        use rand::{RngExt, SeedableRng};
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                let u1 = 1.0 - rng.random::<f64>();
                let u2 = rng.random::<f64>();
                mean + sd * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
            })
            .collect()
    }

    /// PSI of N(0,1) against N(mu,1) over the standard normal's deciles, by
    /// numerical integration of the normal CDF (the value the sample PSI
    /// converges to).
    fn theoretical_psi(mu: f64) -> f64 {
        fn cdf(x: f64) -> f64 {
            // Abramowitz–Stegun 7.1.26 erf, |error| < 1.5e-7
            let z = x / std::f64::consts::SQRT_2;
            let t = 1.0 / (1.0 + 0.3275911 * z.abs());
            let y = 1.0 - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t * (-z * z).exp();
            0.5 * (1.0 + if z >= 0.0 { y } else { -y })
        }
        // deciles of N(0,1)
        let q = [-1.2815515655, -0.8416212336, -0.5244005127, -0.2533471031, 0.0, 0.2533471031, 0.5244005127, 0.8416212336, 1.2815515655];
        let mut edges = vec![f64::NEG_INFINITY];
        edges.extend(q);
        edges.push(f64::INFINITY);
        let mut s = 0.0;
        for w in edges.windows(2) {
            let c = cdf(w[1] - mu) - cdf(w[0] - mu);
            s += (c - 0.1) * (c / 0.1).ln();
        }
        s
    }

    #[test]
    fn hand_computed_psi() {
        // shares 0.5/0.5 vs 0.9/0.1: (0.4 ln 1.8) + (-0.4 ln 0.2)
        let v = psi(&[0.5, 0.5], &[0.9, 0.1]);
        assert!((v - (0.4 * 1.8f64.ln() - 0.4 * 0.2f64.ln())).abs() < 1e-15);
        assert_eq!(psi(&[0.2, 0.3, 0.5], &[0.2, 0.3, 0.5]), 0.0);
        // an empty bin is floored at EPSILON, so PSI stays finite
        let v = psi(&[0.5, 0.5, 0.0], &[0.5, 0.4, 0.1]);
        let expect = (0.4 - 0.5) * (0.4f64 / 0.5).ln() + (0.1 - EPSILON) * (0.1 / EPSILON).ln();
        assert!((v - expect).abs() < 1e-15 && v.is_finite());
    }

    #[test]
    fn identical_distribution_is_zero_and_deciles_hold_a_tenth_each() {
        let r: Vec<f64> = (0..1000).map(|i| i as f64).collect();
        let d = compare("x", &r, &r, DEFAULT_WARN_PSI, DEFAULT_MAX_PSI).unwrap();
        assert_eq!(d.psi, 0.0);
        assert_eq!(d.bins.len(), 10);
        assert!(d.bins.iter().all(|b| (b.reference - 0.1).abs() < 1e-12));
        // inverted-CDF deciles: sorted[ceil(k*1000/10)-1] = 99, 199, ...
        assert_eq!(quantile_edges(&r), vec![99.0, 199.0, 299.0, 399.0, 499.0, 599.0, 699.0, 799.0, 899.0]);
        assert_eq!(d.level, Level::Ok);
    }

    #[test]
    fn shifted_normals_match_the_theoretical_psi() {
        let r = normals(200_000, 1, 0.0, 1.0);
        // same distribution, other draw: small
        let same = compare("x", &r, &normals(200_000, 2, 0.0, 1.0), 0.1, 0.25).unwrap();
        assert!(same.psi < 0.002, "{}", same.psi);
        for (mu, level) in [(0.25, Level::Ok), (0.5, Level::Warn), (1.0, Level::Fail)] {
            let d = compare("x", &r, &normals(200_000, 3, mu, 1.0), 0.1, 0.25).unwrap();
            let t = theoretical_psi(mu);
            assert!((d.psi - t).abs() < 0.01 + 0.03 * t, "mu {mu}: sample PSI {} vs theory {t}", d.psi);
            assert_eq!(d.level, level, "mu {mu}: psi {}", d.psi);
        }
        // the textbook values: a shift of one standard deviation is far above 0.25
        assert!(theoretical_psi(1.0) > 0.8 && theoretical_psi(0.25) < 0.1);
    }

    #[test]
    fn ties_merge_duplicate_edges() {
        // 0/1 feature with 20 % ones: deciles are 0 (x8) and 1 -> edges [0, 1]
        let r: Vec<f64> = (0..100).map(|i| if i < 80 { 0.0 } else { 1.0 }).collect();
        assert_eq!(quantile_edges(&r), vec![0.0, 1.0]);
        let c: Vec<f64> = (0..100).map(|i| if i < 50 { 0.0 } else { 1.0 }).collect();
        let d = compare("seg", &r, &c, 0.1, 0.25).unwrap();
        assert_eq!(d.bins.len(), 3);
        assert_eq!((d.bins[0].reference, d.bins[1].reference, d.bins[2].reference), (0.8, 0.2, 0.0));
        let expect = psi(&[0.8, 0.2, 0.0], &[0.5, 0.5, 0.0]);
        assert!((d.psi - expect).abs() < 1e-15);
        assert!(d.psi > 0.25 && d.level == Level::Fail);
        // a constant reference: two bins, `<= c` and `> c`
        let k = vec![3.0; 50];
        assert_eq!(quantile_edges(&k), vec![3.0]);
        let d = compare("k", &k, &[3.0, 3.0, 4.0, 4.0], 0.1, 0.25).unwrap();
        assert_eq!(d.bins.len(), 2);
        assert_eq!(d.out_of_range_share, 0.5);
    }

    #[test]
    fn missing_and_out_of_range_shares() {
        let r: Vec<f64> = (0..100).map(|i| i as f64).collect();
        let c = [f64::NAN, -1.0, 5.0, 50.0, 200.0, f64::INFINITY, 99.0, 0.0];
        let d = compare("x", &r, &c, 0.1, 0.25).unwrap();
        assert_eq!(d.missing_share, 1.0 / 8.0);
        assert_eq!(d.out_of_range_share, 3.0 / 8.0); // -1, 200, inf
        assert_eq!((d.reference_min, d.reference_max), (0.0, 99.0));
        // shares are over the 7 non-missing values and sum to 1
        assert!((d.bins.iter().map(|b| b.current).sum::<f64>() - 1.0).abs() < 1e-12);
        assert!(compare("x", &[f64::NAN], &[1.0], 0.1, 0.25).is_err());
        assert!(compare("x", &[1.0], &[f64::NAN], 0.1, 0.25).unwrap_err().to_string().contains("feature x"));
    }

    #[test]
    fn levels() {
        assert_eq!(Level::of(0.099, 0.1, 0.25), Level::Ok);
        assert_eq!(Level::of(0.1, 0.1, 0.25), Level::Warn);
        assert_eq!(Level::of(0.25, 0.1, 0.25), Level::Warn);
        assert_eq!(Level::of(0.2501, 0.1, 0.25), Level::Fail);
    }
}
