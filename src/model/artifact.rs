//! The self-describing model artifact (spec §7, §8): JSON, deterministic bytes.
//!
//! Signed: the artifact carries a `mac` (keyed blake3 under the workspace
//! integrity key, domain `workspace::record::MODEL`, over the canonical JSON
//! of every other field) and names its tenant. [`load_verified`] is the one
//! way to get a model to serve: parse, verify the MAC, check the tenant.

use crate::crypto::IntegrityKey;
use crate::workspace::record;
use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

use crate::features::v1::{self, TenantStats};
use crate::model::logistic::predict_row;
use crate::model::metrics::Metrics;
use crate::model::scaler::Scaler;

/// Artifact format identifier.
pub const FORMAT: &str = "dagrun-model/1";
/// The most bytes a model artifact may have when read back (a few KiB in
/// practice; a link to `/dev/zero` or a huge file is refused, not read whole).
pub const MAX_MODEL_BYTES: u64 = 16 << 20;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ModelArtifact {
    /// Always [`FORMAT`].
    pub format: String,
    pub tenant: String,
    pub model_version: String,
    pub feature_set_version: String,
    pub feature_names: Vec<String>,
    pub feature_file: String,
    /// blake3 hex of the feature file the model was trained on.
    pub feature_file_hash: String,
    pub feature_stats: TenantStats,
    pub as_of: String,
    pub scaler: Scaler,
    /// In scaled feature space, for class `true`.
    pub coefficients: Vec<f64>,
    pub intercept: f64,
    pub c: f64,
    /// Solver details, e.g. [`crate::model::Fitted::solver_json`].
    pub solver: serde_json::Value,
    pub metrics: Metrics,
    pub lineage: serde_json::Value,
    /// MAC under the workspace integrity key (see the module docs); set by [`ModelArtifact::seal`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// Why a model must not be served.
#[derive(Debug, thiserror::Error)]
pub enum ModelRefused {
    #[error("refusing to serve model {origin}: {why}")]
    NotAuthentic { origin: String, why: String },
    #[error("refusing to serve model {origin}: it is tenant {found}'s model, not tenant {wanted}'s")]
    OtherTenant { origin: String, found: String, wanted: String },
}

/// The one check before serving a model: parse `bytes` (from `origin`, named
/// in every error), verify its MAC under the workspace integrity key, validate
/// it, and check it belongs to `tenant`. A model edited outside dagrun, one
/// without a MAC, one made under another master key (workspaces sharing a
/// master key share the integrity key), or another tenant's model is refused.
pub fn load_verified(bytes: &[u8], origin: &str, key: &IntegrityKey, tenant: &str) -> Result<ModelArtifact> {
    let a: ModelArtifact = record::open(Some(key), record::MODEL, bytes, origin).map_err(|e| ModelRefused::NotAuthentic {
        origin: origin.to_string(),
        why: match e {
            record::RecordError::BadMac { .. } => "its MAC does not verify: it was modified outside dagrun (or made under another master key)".to_string(),
            record::RecordError::NoMac { .. } => {
                "it carries no MAC: it was not made by dagrun's train stage in this workspace (or was modified outside dagrun)".to_string()
            }
            other => other.to_string(),
        },
    })?;
    a.validate(origin)?;
    if a.tenant != tenant {
        return Err(ModelRefused::OtherTenant {
            origin: origin.to_string(),
            found: if crate::data::is_valid_tenant_id(&a.tenant) { a.tenant.clone() } else { crate::data::show_tenant(&a.tenant) },
            wanted: tenant.to_string(),
        }
        .into());
    }
    Ok(a)
}

impl ModelArtifact {
    /// Pretty JSON plus a trailing newline. Deterministic: struct fields in
    /// declaration order, `serde_json::Value` objects in their map's order,
    /// floats written round-trip exactly (`float_roundtrip`); no timestamps.
    /// Call [`ModelArtifact::validate`] first: non-finite floats would be
    /// written as `null` and the file would not load back.
    /// Set the MAC (call last, after every other field is final).
    pub fn seal(&mut self, key: &IntegrityKey) -> Result<()> {
        self.mac = None;
        let v = serde_json::to_value(&*self)?;
        self.mac = Some(record::mac_of(key, record::MODEL, &v));
        Ok(())
    }

    pub fn to_json_bytes(&self) -> Vec<u8> {
        // Serialising plain structs, strings, f64 and serde_json::Value to a
        // Vec cannot fail (no non-string map keys, no custom Serialize).
        let mut out = serde_json::to_vec_pretty(self).expect("serialising ModelArtifact to JSON cannot fail");
        out.push(b'\n');
        out
    }

    /// Parse and [`validate`](ModelArtifact::validate). `origin` (a path or
    /// description) is named in every error.
    pub fn from_json_bytes(bytes: &[u8], origin: &str) -> Result<Self> {
        // The parse error without the values it would quote (the file may be
        // any file a tampered record names).
        let a: ModelArtifact = match crate::util::redact::from_json(bytes) {
            Ok(a) => a,
            Err(e) => bail!("{origin}: not a valid {FORMAT} model artifact: {e}"),
        };
        a.validate(origin)?;
        Ok(a)
    }

    /// Structural checks: format string, 5 features in v1 order for `v1.0`,
    /// coefficient/scaler lengths equal to `feature_names`, finite numbers,
    /// non-zero scales, C > 0.
    pub fn validate(&self, origin: &str) -> Result<()> {
        if self.format != FORMAT {
            bail!("{origin}: unsupported model format {:?} (expected {FORMAT:?})", self.format);
        }
        let k = self.feature_names.len();
        if k != v1::FEATURE_NAMES.len() {
            bail!("{origin}: model has {k} feature names; this build scores {} features", v1::FEATURE_NAMES.len());
        }
        if self.feature_set_version == v1::VERSION && self.feature_names.iter().zip(v1::FEATURE_NAMES).any(|(a, b)| a != b) {
            bail!("{origin}: feature names {:?} do not match feature set {} {:?}", self.feature_names, v1::VERSION, v1::FEATURE_NAMES);
        }
        for (what, len) in [("coefficients", self.coefficients.len()), ("scaler.mean", self.scaler.mean.len()), ("scaler.scale", self.scaler.scale.len())] {
            if len != k {
                bail!("{origin}: {what} has {len} entries but there are {k} feature names");
            }
        }
        let finite = |what: &str, vals: &[f64]| -> Result<()> {
            if let Some(v) = vals.iter().find(|v| !v.is_finite()) {
                bail!("{origin}: {what} contains a non-finite value ({v})");
            }
            Ok(())
        };
        finite("coefficients", &self.coefficients)?;
        finite("intercept", &[self.intercept])?;
        finite("scaler.mean", &self.scaler.mean)?;
        finite("scaler.scale", &self.scaler.scale)?;
        if self.scaler.scale.contains(&0.0) {
            bail!("{origin}: scaler.scale contains 0");
        }
        finite("feature_stats", &[self.feature_stats.mean_login, self.feature_stats.p80_purchase])?;
        let m = &self.metrics;
        finite("metrics", &[m.auc, m.log_loss, m.accuracy, m.positive_rate])?;
        if !self.c.is_finite() || self.c <= 0.0 {
            bail!("{origin}: C must be finite and > 0, got {}", self.c);
        }
        Ok(())
    }

    /// P(converted) for one row of raw v1 features (in `FEATURE_NAMES` order):
    /// scale with the stored scaler, then sigmoid. The same function
    /// ([`predict_row`]) scores offline and when serving.
    pub fn predict_proba_row(&self, x: &[f64; 5]) -> f64 {
        predict_row(&self.scaler, &self.coefficients, self.intercept, x)
    }

    pub fn predict_proba(&self, rows: &[[f64; 5]]) -> Vec<f64> {
        rows.iter().map(|r| self.predict_proba_row(r)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> ModelArtifact {
        ModelArtifact {
            format: FORMAT.to_string(),
            tenant: "Tenant_A".into(),
            model_version: "m-1".into(),
            feature_set_version: v1::VERSION.into(),
            feature_names: v1::FEATURE_NAMES.iter().map(|s| s.to_string()).collect(),
            feature_file: "features/Tenant_A/v1.0.parquet".into(),
            feature_file_hash: blake3::hash(b"x").to_hex().to_string(),
            feature_stats: TenantStats { mean_login: 11.123456789012345, p80_purchase: 123.45, rows: 1000 },
            as_of: "2026-01-01".into(),
            scaler: Scaler { mean: vec![182.3, 1.0, 0.2, 8.123456789, 0.31], scale: vec![105.1, 0.3, 0.4, 12.0, 0.1 + 0.2] },
            coefficients: vec![-1.0512345678901234, 0.24, 0.6, 0.024, 0.05],
            intercept: -0.1 - 0.2,
            c: 1.0,
            solver: json!({"library": "x", "newton_steps": 2, "grad_norm": 1.5e-17}),
            metrics: Metrics { auc: 0.8, log_loss: 0.45, accuracy: 0.78, positive_rate: 0.3, rows_train: 800, rows_test: 200, positives_test: 60 },
            lineage: json!({"z": 1, "a": [1, 2], "m": {"k": "v"}}),
            mac: None,
        }
    }

    #[test]
    fn sealed_models_verify_and_edits_or_other_tenants_are_refused() {
        let k = IntegrityKey::from_bytes([9; 32]);
        let mut a = sample();
        a.seal(&k).unwrap();
        let b = a.to_json_bytes();
        assert_eq!(load_verified(&b, "m.json", &k, "Tenant_A").unwrap(), a);
        let e = load_verified(&b, "m.json", &k, "Tenant_B").unwrap_err().to_string();
        assert!(e.contains("tenant Tenant_A's model, not tenant Tenant_B's"), "{e}");
        let mut edited = a.clone();
        edited.intercept = 50.0;
        let e = load_verified(&edited.to_json_bytes(), "m.json", &k, "Tenant_A").unwrap_err().to_string();
        assert!(e.contains("modified outside dagrun") && e.contains("m.json"), "{e}");
        let e = load_verified(&sample().to_json_bytes(), "m.json", &k, "Tenant_A").unwrap_err().to_string();
        assert!(e.contains("no MAC"), "{e}");
        assert!(load_verified(&b, "m.json", &IntegrityKey::from_bytes([1; 32]), "Tenant_A").is_err());
    }

    #[test]
    fn json_round_trip_is_byte_identical() {
        let a = sample();
        let b1 = a.to_json_bytes();
        let back = ModelArtifact::from_json_bytes(&b1, "mem").unwrap();
        assert_eq!(back, a);
        let b2 = back.to_json_bytes();
        assert_eq!(b1, b2);
        // floats bitwise preserved -> scores bitwise identical
        let row = [30.0, 1.2, 1.0, 15.5, 0.8];
        assert_eq!(a.predict_proba_row(&row).to_bits(), back.predict_proba_row(&row).to_bits());
        assert_eq!(a.predict_proba(&[row, row]), vec![a.predict_proba_row(&row); 2]);
        assert!(std::str::from_utf8(&b1).unwrap().contains("\"format\": \"dagrun-model/1\""));
    }

    #[test]
    fn rejects_bad_artifacts() {
        let mut a = sample();
        a.format = "dagrun-model/0".into();
        let e = ModelArtifact::from_json_bytes(&a.to_json_bytes(), "models/A.json").unwrap_err().to_string();
        assert!(e.contains("models/A.json") && e.contains("unsupported model format"), "{e}");

        let mut a = sample();
        a.coefficients.pop();
        let e = ModelArtifact::from_json_bytes(&a.to_json_bytes(), "m.json").unwrap_err().to_string();
        assert!(e.contains("m.json") && e.contains("coefficients has 4 entries"), "{e}");

        let mut a = sample();
        a.scaler.scale.push(1.0);
        assert!(ModelArtifact::from_json_bytes(&a.to_json_bytes(), "m").is_err());

        let mut a = sample();
        a.feature_names.swap(0, 1);
        assert!(ModelArtifact::from_json_bytes(&a.to_json_bytes(), "m").is_err());

        let mut a = sample();
        a.intercept = f64::NAN; // written as null -> parse error naming origin
        let e = ModelArtifact::from_json_bytes(&a.to_json_bytes(), "nan.json").unwrap_err().to_string();
        assert!(e.contains("nan.json"), "{e}");
        assert!(a.validate("v").unwrap_err().to_string().contains("intercept"));

        let e = ModelArtifact::from_json_bytes(b"{not json", "junk.json").unwrap_err().to_string();
        assert!(e.contains("junk.json"), "{e}");
        assert!(ModelArtifact::from_json_bytes(b"", "empty").is_err());
    }
}
