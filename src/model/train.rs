//! Orchestration of the `train` stage for one tenant (spec §7): split by
//! customer, fit the scaler on the train split, fit the logistic model, score
//! the test split through [`predict_row`] and compute metrics.

use anyhow::{Result, bail};
use ndarray::Array2;

use crate::model::logistic::{self, Fitted, predict_row};
use crate::model::metrics::{self, Metrics};
use crate::model::scaler::Scaler;

/// One tenant's training rows: v1 features in `FEATURE_NAMES` order and labels.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainingData {
    pub tenant: String,
    pub customer_id: Vec<i64>,
    pub x: Vec<[f64; 5]>,
    pub y: Vec<bool>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TrainOutcome {
    pub scaler: Scaler,
    pub fitted: Fitted,
    pub metrics: Metrics,
    /// (Customer_ID, P(converted)) for every test row, in input order,
    /// computed with the same function serving uses.
    pub test_scores: Vec<(i64, f64)>,
    /// The test rows' labels, aligned with `test_scores`.
    pub test_labels: Vec<bool>,
}

/// One tenant's rows already split by customer (`model::split`), filled
/// batch by batch with [`SplitData::push`]: the training rows go straight
/// into the row-major matrix the solver fits (no full copy of the tenant's
/// rows is ever held beside it), the test rows into what scoring needs.
#[derive(Clone, Debug, Default)]
pub struct SplitData {
    pub tenant: String,
    /// Training rows, row-major, `FEATURE_NAMES` order (5 values a row).
    train_x: Vec<f64>,
    train_y: Vec<bool>,
    test_id: Vec<i64>,
    test_x: Vec<[f64; 5]>,
    test_y: Vec<bool>,
}

impl SplitData {
    /// An empty split for `tenant`; `rows_hint` (e.g. the feature manifest's
    /// row count) reserves room up front, so the matrix is never reallocated
    /// (reserved but unwritten pages cost no memory).
    pub fn new(tenant: &str, rows_hint: usize) -> SplitData {
        let mut s = SplitData { tenant: tenant.to_string(), ..Default::default() };
        s.train_x.reserve_exact(rows_hint.saturating_mul(5));
        s.train_y.reserve_exact(rows_hint);
        s
    }

    /// Add rows (customer ids, features, labels; equal lengths). Refuses a
    /// non-finite feature, naming its customer.
    pub fn push(&mut self, ids: &[i64], x: &[[f64; 5]], y: &[bool]) -> Result<()> {
        let t = &self.tenant;
        if ids.len() != x.len() || y.len() != x.len() {
            bail!("tenant {t}: training data mismatch: {} customer ids, {} feature rows, {} labels", ids.len(), x.len(), y.len());
        }
        self.push_rows(ids, |i| x[i], |i| y[i])
    }

    /// [`SplitData::push`] from columns as a feature file stores them: one
    /// slice per feature (`FEATURE_NAMES` order) and a label per row, read
    /// straight into the split (no row copy in between).
    pub fn push_columns(&mut self, ids: &[i64], cols: &[Vec<f64>; 5], y: impl Fn(usize) -> bool) -> Result<()> {
        let t = &self.tenant;
        if let Some(c) = cols.iter().find(|c| c.len() != ids.len()) {
            bail!("tenant {t}: training data mismatch: {} customer ids, {} values of a feature", ids.len(), c.len());
        }
        self.push_rows(ids, |i| [cols[0][i], cols[1][i], cols[2][i], cols[3][i], cols[4][i]], y)
    }

    /// Row `i` of `ids.len()` rows is `(ids[i], row(i), y(i))`.
    fn push_rows(&mut self, ids: &[i64], row: impl Fn(usize) -> [f64; 5], y: impl Fn(usize) -> bool) -> Result<()> {
        if let Some(i) = (0..ids.len()).find(|&i| row(i).iter().any(|v| !v.is_finite())) {
            bail!("tenant {}: features of Customer_ID {} contain a non-finite value: cannot train", self.tenant, ids[i]);
        }
        let mask = crate::model::split::test_mask(&self.tenant, ids);
        for (i, &test) in mask.iter().enumerate() {
            if test {
                self.test_id.push(ids[i]);
                self.test_x.push(row(i));
                self.test_y.push(y(i));
            } else {
                self.train_x.extend_from_slice(&row(i));
                self.train_y.push(y(i));
            }
        }
        Ok(())
    }
}

/// Train one tenant's model with regularisation `c` (scikit-learn's C).
///
/// Errors (messages name the tenant): length mismatch, no rows, non-finite
/// features, an empty train or test split, single-class train labels, and
/// single-class test labels (ROC AUC would be undefined, so `min_auc` could
/// not be checked).
pub fn train(data: &TrainingData, c: f64) -> Result<TrainOutcome> {
    let mut split = SplitData::new(&data.tenant, data.x.len());
    split.push(&data.customer_id, &data.x, &data.y)?;
    train_split(split, c)
}

/// [`train`] on rows already split (see [`SplitData`]).
pub fn train_split(data: SplitData, c: f64) -> Result<TrainOutcome> {
    let SplitData { tenant, train_x, train_y: tr_y, test_id: te_id, test_x: te_x, test_y: te_y } = data;
    let t = &tenant;
    let (n_train, n_test) = (tr_y.len(), te_y.len());
    let n = n_train + n_test;
    if n == 0 {
        bail!("tenant {t}: no training rows");
    }
    if n_train == 0 {
        bail!("tenant {t}: the train split is empty ({n} rows, all in the test split): need more customers");
    }
    if n_test == 0 {
        bail!("tenant {t}: the test split is empty ({n} rows, none in the test split): need more customers");
    }
    // The matrix the solver needs is the training rows themselves (scaled
    // in place); test rows are scored one by one.
    let mut x_train = Array2::from_shape_vec((n_train, 5), train_x).map_err(|e| anyhow::anyhow!("tenant {t}: training matrix: {e}"))?;
    let t0 = std::time::Instant::now();
    let scaler = Scaler::fit(&x_train);
    scaler.transform_inplace(&mut x_train);
    let fitted = logistic::fit(&x_train, &tr_y, c).map_err(|e| e.context(format!("tenant {t}: training failed")))?;
    drop(x_train);
    tracing::debug!("tenant {t}: split+scale+fit {:.3}s", t0.elapsed().as_secs_f64());
    let tr_len = tr_y.len();
    let test_pos = te_y.iter().filter(|&&v| v).count();
    if test_pos == 0 || test_pos == te_y.len() {
        bail!(
            "tenant {t}: all {} test-split labels are {}: ROC AUC is undefined; need more rows",
            te_y.len(),
            if test_pos == 0 { "0 (not converted)" } else { "1 (converted)" }
        );
    }
    let p: Vec<f64> = te_x.iter().map(|r| predict_row(&scaler, &fitted.coef, fitted.intercept, r)).collect();
    let metrics = Metrics {
        auc: metrics::roc_auc(&te_y, &p),
        log_loss: metrics::log_loss(&te_y, &p),
        accuracy: metrics::accuracy(&te_y, &p),
        positive_rate: metrics::positive_rate(&te_y),
        rows_train: tr_len as u64,
        rows_test: te_x.len() as u64,
        positives_test: test_pos as u64,
    };
    let test_scores = te_id.into_iter().zip(p).collect();
    Ok(TrainOutcome { scaler, fitted, metrics, test_scores, test_labels: te_y })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::v1;
    use crate::model::split::is_test;
    use rand::rngs::ChaCha8Rng;
    use rand::{RngExt, SeedableRng};
    use std::time::Instant;

    /// 2026-01-01 as days since 1970-01-01.
    const AS_OF: i32 = 20454;

    /// Raw rows as the generator of spec §2 would draw them, v1 features,
    /// labels from spec §5.
    fn generate(n: usize, seed: u64) -> TrainingData {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let l = (-11.0f64).exp();
        let mut logins = Vec::with_capacity(n);
        let mut purchases = Vec::with_capacity(n);
        let mut visits = Vec::with_capacity(n);
        for _ in 0..n {
            // Knuth's Poisson(11) sampler
            let (mut k, mut prod) = (0i64, rng.random::<f64>());
            while prod > l {
                k += 1;
                prod *= rng.random::<f64>();
            }
            logins.push(k);
            // log-normal(mu 4, sigma 1.25) via Box–Muller, rounded to cents (wide
            // enough that the 0.002 Purchase_Login_Ratio coefficient is > 5 SE from 0)
            let u1 = 1.0 - rng.random::<f64>();
            let u2 = rng.random::<f64>();
            let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
            purchases.push(((4.0 + 1.25 * z).exp() * 100.0).round() / 100.0);
            visits.push(AS_OF - rng.random_range(0..365i32));
        }
        let mut sorted = purchases.clone();
        let stats = v1::fit(&logins, &mut sorted);
        let mut x = Vec::with_capacity(n);
        let mut y = Vec::with_capacity(n);
        for i in 0..n {
            let f = v1::transform(&stats, AS_OF, logins[i], purchases[i], visits[i]);
            x.push(f.as_array());
            y.push(rng.random::<f64>() < v1::sigmoid(v1::label_logit(&f)));
        }
        TrainingData { tenant: "Tenant_R".into(), customer_id: (0..n as i64).collect(), x, y }
    }

    /// Inverse of a small SPD matrix (Gauss–Jordan), for standard errors.
    fn invert(a: &[Vec<f64>]) -> Vec<Vec<f64>> {
        let d = a.len();
        let mut m: Vec<Vec<f64>> = a
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let mut r = r.clone();
                r.extend((0..d).map(|j| if i == j { 1.0 } else { 0.0 }));
                r
            })
            .collect();
        for c in 0..d {
            let p = (c..d).max_by(|&i, &j| m[i][c].abs().total_cmp(&m[j][c].abs())).unwrap();
            m.swap(c, p);
            let piv = m[c][c];
            for v in m[c].iter_mut() {
                *v /= piv;
            }
            for r in 0..d {
                if r != c {
                    let f = m[r][c];
                    for cc in 0..2 * d {
                        m[r][cc] -= f * m[c][cc];
                    }
                }
            }
        }
        m.into_iter().map(|r| r[d..].to_vec()).collect()
    }

    #[test]
    fn recovers_generating_coefficients() {
        let data = generate(200_000, 20260101);
        let t0 = Instant::now();
        let out = train(&data, 1.0).unwrap();
        let dt = t0.elapsed();
        let s = &out.scaler;
        let f = &out.fitted;
        // back to raw feature space
        let w: Vec<f64> = (0..5).map(|j| f.coef[j] / s.scale[j]).collect();
        let b = f.intercept - (0..5).map(|j| f.coef[j] * s.mean[j] / s.scale[j]).sum::<f64>();

        // Asymptotic standard errors from the Fisher information at the fit,
        // over the training rows: Cov = (Σ p(1-p) x̃ x̃ᵀ)⁻¹, x̃ = (x, 1).
        let mut info = vec![vec![0.0; 6]; 6];
        for (i, r) in data.x.iter().enumerate() {
            if is_test(&data.tenant, data.customer_id[i]) {
                continue;
            }
            let mut xt = r.to_vec();
            xt.push(1.0);
            let z = b + (0..5).map(|j| w[j] * r[j]).sum::<f64>();
            let p = v1::sigmoid(z);
            for a in 0..6 {
                for c in 0..6 {
                    info[a][c] += p * (1.0 - p) * xt[a] * xt[c];
                }
            }
        }
        let cov = invert(&info);
        let se: Vec<f64> = (0..6).map(|j| cov[j][j].sqrt()).collect();
        let mut est = w.clone();
        est.push(b);
        let mut truth = v1::LABEL_COEFFICIENTS.to_vec();
        truth.push(v1::LABEL_INTERCEPT);
        let names = ["Recency_Days", "Frequency_Ratio", "High_Value_Segment", "Purchase_Login_Ratio", "Activity_Score", "intercept"];
        for j in 0..6 {
            eprintln!("{:<22} true {:>7} est {:>10.6} se {:.6} z {:+.2}", names[j], truth[j], est[j], se[j], (est[j] - truth[j]) / se[j]);
        }
        eprintln!(
            "rows_train={} fit+score {dt:?} newton_steps={} lbfgs_grad={:e} grad={:e} bound={:e} auc={:.4}",
            out.metrics.rows_train, f.iterations, f.lbfgs_grad_norm, f.grad_norm, f.logit_error_bound, out.metrics.auc
        );
        // (1) Each estimate within 5 standard errors of the truth (C = 1 on
        // 160k rows: the penalty bias is ~1e-5 of a coefficient, negligible).
        // Under a correct fit a 5-SE miss has probability ~6e-7 per coefficient.
        for j in 0..6 {
            assert!((est[j] - truth[j]).abs() < 5.0 * se[j], "{}: est {} true {} se {}", names[j], est[j], truth[j], se[j]);
        }
        // (2) The standard errors are small enough for (1) to mean something.
        assert!(se[0] < 0.001 && se[3] < 0.0004, "SEs too large: {se:?}");
        assert!(se[1] < 0.05 && se[2] < 0.05 && se[4] < 0.05 && se[5] < 0.05, "{se:?}");
        // (3) Fixed, looser bounds, independent of the SE computation.
        for j in [1, 2, 4, 5] {
            assert!((est[j] - truth[j]).abs() < 0.15, "{}: {}", names[j], est[j]);
        }
        assert!(est[0] < 0.0 && (est[0] + 0.01).abs() < 0.002, "Recency_Days {}", est[0]);
        assert!(est[3] > 0.0 && (est[3] - 0.002).abs() < 0.0015, "Purchase_Login_Ratio {}", est[3]);
        assert!(est[3] < est[0].abs(), "magnitude order of 0.002 vs -0.01");
        // sanity of the split and metrics
        let frac = out.metrics.rows_test as f64 / 200_000.0;
        assert!((frac - 0.2).abs() < 0.01, "{frac}");
        assert!(out.metrics.auc > 0.7 && out.metrics.auc < 1.0);
        assert_eq!(out.test_scores.len() as u64, out.metrics.rows_test);
    }

    #[test]
    fn test_scores_equal_artifact_scores_bitwise() {
        use crate::model::artifact::{FORMAT, ModelArtifact};
        let data = generate(3000, 5);
        let out = train(&data, 1.0).unwrap();
        let art = ModelArtifact {
            format: FORMAT.into(),
            tenant: data.tenant.clone(),
            model_version: "m".into(),
            feature_set_version: v1::VERSION.into(),
            feature_names: v1::FEATURE_NAMES.iter().map(|s| s.to_string()).collect(),
            feature_file: "f".into(),
            feature_file_hash: "h".into(),
            feature_stats: v1::TenantStats { mean_login: 11.0, p80_purchase: 100.0, rows: 3000 },
            as_of: "2026-01-01".into(),
            scaler: out.scaler.clone(),
            coefficients: out.fitted.coef.clone(),
            intercept: out.fitted.intercept,
            c: 1.0,
            solver: out.fitted.solver_json(),
            metrics: out.metrics.clone(),
            lineage: serde_json::json!({}),
            mac: None,
        };
        let bytes = art.to_json_bytes();
        let back = ModelArtifact::from_json_bytes(&bytes, "mem").unwrap();
        assert_eq!(back.to_json_bytes(), bytes);
        let by_id: std::collections::HashMap<i64, [f64; 5]> = data.customer_id.iter().copied().zip(data.x.iter().copied()).collect();
        for (id, p) in &out.test_scores {
            assert_eq!(back.predict_proba_row(&by_id[id]).to_bits(), p.to_bits());
        }
        // metrics recomputed from the scores
        let ys: Vec<bool> = out.test_scores.iter().map(|(id, _)| data.y[*id as usize]).collect();
        let ps: Vec<f64> = out.test_scores.iter().map(|(_, p)| *p).collect();
        assert_eq!(metrics::roc_auc(&ys, &ps), out.metrics.auc);
    }

    #[test]
    fn refusals() {
        let mut d = generate(200, 1);
        let e = train(&TrainingData { y: vec![false; 200], ..d.clone() }, 1.0).unwrap_err();
        let msg = format!("{e:#}");
        let n_train = (0..200).filter(|&i| !is_test("Tenant_R", i)).count();
        let expect = format!("all {n_train} training labels are 0 (not converted): cannot train a model; need both classes");
        assert!(msg.contains("Tenant_R") && msg.contains(&expect), "{msg}");
        // empty test split: only train customers (Tenant_R ids that are not test)
        let train_ids: Vec<usize> = (0..200).filter(|&i| !is_test("Tenant_R", i as i64)).take(20).collect();
        let sub = TrainingData {
            tenant: "Tenant_R".into(),
            customer_id: train_ids.iter().map(|&i| i as i64).collect(),
            x: train_ids.iter().map(|&i| d.x[i]).collect(),
            y: train_ids.iter().map(|&i| i % 2 == 0).collect(),
        };
        assert!(train(&sub, 1.0).unwrap_err().to_string().contains("test split is empty"));
        let test_ids: Vec<usize> = (0..200).filter(|&i| is_test("Tenant_R", i as i64)).take(5).collect();
        let sub = TrainingData {
            tenant: "Tenant_R".into(),
            customer_id: test_ids.iter().map(|&i| i as i64).collect(),
            x: test_ids.iter().map(|&i| d.x[i]).collect(),
            y: test_ids.iter().map(|&i| i % 2 == 0).collect(),
        };
        assert!(train(&sub, 1.0).unwrap_err().to_string().contains("train split is empty"));
        d.x[3][1] = f64::NAN;
        assert!(train(&d, 1.0).unwrap_err().to_string().contains("non-finite"));
        d.y.pop();
        assert!(train(&d, 1.0).unwrap_err().to_string().contains("mismatch"));
        let empty = TrainingData { tenant: "T".into(), customer_id: vec![], x: vec![], y: vec![] };
        assert!(train(&empty, 1.0).is_err());
    }
}
