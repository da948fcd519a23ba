//! The propensity model (spec §7, §8): hold-out split, standard scaling,
//! L2 logistic regression (scikit-learn `LogisticRegression(C)` objective),
//! metrics, and the self-describing model artifact.
//!
//! Scores are computed by exactly one function, [`logistic::predict_row`];
//! the offline path ([`train::train`]'s test scores) and the serving path
//! ([`artifact::ModelArtifact::predict_proba_row`]) both call it, so identical
//! features and parameters give bitwise identical scores.
pub mod artifact;
pub mod evaluation;
pub mod logistic;
pub mod metrics;
pub mod scaler;
pub mod split;
pub mod train;

pub use artifact::ModelArtifact;
pub use logistic::Fitted;
pub use metrics::Metrics;
pub use scaler::Scaler;
pub use train::{TrainOutcome, TrainingData};
