//! Standard scaler (spec §7): mean and population standard deviation,
//! fitted on the training split; a zero deviation scales by 1.

use ndarray::Array2;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Scaler {
    pub mean: Vec<f64>,
    pub scale: Vec<f64>,
}

impl Scaler {
    /// Column means and population standard deviations (ddof = 0, as
    /// scikit-learn's `StandardScaler`). A column whose values are all equal
    /// (or whose deviation is 0) gets scale 1.0. An empty matrix gives mean 0,
    /// scale 1 per column.
    pub fn fit(x: &Array2<f64>) -> Scaler {
        let (n, k) = x.dim();
        let mut mean = vec![0.0; k];
        let mut scale = vec![1.0; k];
        if n == 0 {
            return Scaler { mean, scale };
        }
        for (j, col) in x.columns().into_iter().enumerate() {
            let m = col.iter().sum::<f64>() / n as f64;
            // two-pass variance: accurate for large means
            let var = col.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / n as f64;
            let first = col[0];
            let constant = col.iter().all(|&v| v == first);
            let sd = var.sqrt();
            mean[j] = m;
            scale[j] = if constant || sd == 0.0 { 1.0 } else { sd };
        }
        Scaler { mean, scale }
    }

    /// `(x - mean) / scale` column-wise. Columns without a fitted mean/scale
    /// (shape mismatch) come out NaN rather than panicking.
    pub fn transform(&self, x: &Array2<f64>) -> Array2<f64> {
        let mut out = x.clone();
        self.transform_inplace(&mut out);
        out
    }

    /// [`Scaler::transform`] without a copy.
    pub fn transform_inplace(&self, x: &mut Array2<f64>) {
        for (j, mut col) in x.columns_mut().into_iter().enumerate() {
            let (m, s) = self.param(j);
            col.mapv_inplace(|v| (v - m) / s);
        }
    }

    /// One row, same arithmetic as [`Scaler::transform`].
    pub fn transform_row(&self, row: &[f64; 5]) -> [f64; 5] {
        let mut out = [0.0; 5];
        for (j, (o, v)) in out.iter_mut().zip(row).enumerate() {
            let (m, s) = self.param(j);
            *o = (v - m) / s;
        }
        out
    }

    #[inline]
    fn param(&self, j: usize) -> (f64, f64) {
        match (self.mean.get(j), self.scale.get(j)) {
            (Some(&m), Some(&s)) => (m, s),
            _ => (f64::NAN, f64::NAN),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn population_std_and_zero_std() {
        // column 0: [1,2,3,4] mean 2.5, population var 1.25 (sample var would be 5/3)
        // column 1: constant 0.1 -> scale 1
        let x = array![[1.0, 0.1], [2.0, 0.1], [3.0, 0.1], [4.0, 0.1]];
        let s = Scaler::fit(&x);
        assert_eq!(s.mean[0], 2.5);
        assert!((s.scale[0] - 1.25f64.sqrt()).abs() < 1e-15);
        assert!((s.mean[1] - 0.1).abs() < 1e-15);
        assert_eq!(s.scale[1], 1.0);
        let t = s.transform(&x);
        assert!((t[[0, 0]] - (1.0 - 2.5) / 1.25f64.sqrt()).abs() < 1e-15);
        assert!(t.column(1).iter().all(|v| v.abs() < 1e-15));
        // transformed column has mean 0, population std 1
        let c = t.column(0);
        let m = c.sum() / 4.0;
        let v = c.iter().map(|a| (a - m) * (a - m)).sum::<f64>() / 4.0;
        assert!(m.abs() < 1e-15 && (v - 1.0).abs() < 1e-14);
    }

    #[test]
    fn row_and_matrix_agree_bitwise() {
        let x = array![[3.0, 1.5, 0.0, 12.25, 0.7], [10.0, 0.2, 1.0, 3.5, 0.01], [300.0, 2.0, 1.0, 0.0, 0.0]];
        let s = Scaler::fit(&x);
        let t = s.transform(&x);
        for i in 0..3 {
            let row = [x[[i, 0]], x[[i, 1]], x[[i, 2]], x[[i, 3]], x[[i, 4]]];
            let r = s.transform_row(&row);
            for j in 0..5 {
                assert_eq!(r[j].to_bits(), t[[i, j]].to_bits());
            }
        }
        // malformed scaler: NaN, no panic
        let bad = Scaler { mean: vec![0.0], scale: vec![1.0] };
        let r = bad.transform_row(&[1.0; 5]);
        assert_eq!(r[0], 1.0);
        assert!(r[4].is_nan());
        assert_eq!(Scaler::fit(&Array2::zeros((0, 3))).scale, vec![1.0; 3]);
    }
}
