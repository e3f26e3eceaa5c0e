//! The library's error type: every variant says what went wrong and, where it can, what to do.

use std::path::PathBuf;

/// Result alias used throughout the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong between a description and an adapter on disk.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The model bundle is missing a file, has a wrong hash, or is internally inconsistent.
    #[error("model bundle {}: {what}", path.display())]
    Bundle {
        /// The bundle file (or directory) at fault.
        path: PathBuf,
        /// What is wrong with it.
        what: String,
    },
    /// A file could not be read or written.
    #[error("{action} {}: {cause}", path.display())]
    Io {
        /// What we were doing (`"reading"`, `"writing"`, …).
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The operating-system error (part of the message, so not also a `source`).
        cause: std::io::Error,
    },
    /// The task description cannot be used (empty, too long, control characters, …).
    #[error("invalid description: {0}")]
    InvalidDescription(String),
    /// A text to embed cannot be used (empty, too long).
    #[error("invalid text: {0}")]
    InvalidText(String),
    /// A generation option is out of range.
    #[error("invalid option: {0}")]
    InvalidOption(String),
    /// No expert is semantically close enough to the description.
    #[error(
        "the description is out of distribution: the closest expert ({expert}) has similarity \
         {best:.3}, below the threshold {threshold:.3}; describe the task in terms of what is matched \
         with what, or allow out-of-distribution generation explicitly"
    )]
    OutOfDistribution {
        /// Best retrieval score of any expert.
        best: f32,
        /// The configured threshold.
        threshold: f32,
        /// Name of the closest expert.
        expert: String,
    },
    /// The scope classifier does not take the description for a task of this bundle's kind.
    #[error(
        "the description is out of distribution: it does not read as a task this bundle's experts \
         cover (scope score {score:.2}, below {threshold:.2}; the closest expert is {expert}); say \
         what is matched with what, e.g. \"given a word, find its opposite\", or allow \
         out-of-distribution generation explicitly"
    )]
    OutOfScope {
        /// The scope classifier's score.
        score: f64,
        /// `ood.scope.min_score`.
        threshold: f64,
        /// Name of the closest expert.
        expert: String,
    },
    /// The bundle's gain model expects too little of the adapter for the caller's
    /// `min_expected_gain`.
    #[error(
        "the expected gain is too low: an adapter for this description is expected to improve \
         R@1 by {estimate:+.1} points (interval {low:+.1} … {high:+.1}), below the minimum \
         {threshold:.1} asked for; describe the relation (what is matched with what) and the \
         domain of the task more precisely, or lower or unset min_expected_gain"
    )]
    LowExpectedGain {
        /// The model's estimate, in R@1 points.
        estimate: f64,
        /// Lower end of its interval.
        low: f64,
        /// Upper end of its interval.
        high: f64,
        /// The `min_expected_gain` asked for.
        threshold: f64,
    },
    /// The neural network runtime failed (tokeniser, encoder, CVAE).
    #[error("{stage} failed: {message}")]
    Model {
        /// Which stage failed.
        stage: &'static str,
        /// The runtime's message.
        message: String,
    },
    /// An adapter directory cannot be applied to this bundle's base model (another base model,
    /// PEFT method, module or shape, a damaged file).
    #[error("adapter {}: {what}", path.display())]
    Adapter {
        /// The adapter directory.
        path: PathBuf,
        /// What is wrong with it.
        what: String,
    },
    /// The expert overlay file (experts added on the device) cannot be read.
    #[error("expert overlay {}: {what}", path.display())]
    Overlay {
        /// The overlay file.
        path: PathBuf,
        /// What is wrong with it.
        what: String,
    },
    /// An expert cannot be added or removed (a name in use or unknown, a projection too poor).
    #[error("{0}")]
    Expert(String),
    /// The adapter could not be delivered where it was asked for.
    #[error("output {}: {what}", path.display())]
    Output {
        /// The output directory.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
}

impl Error {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        Error::Io {
            action,
            path: path.into(),
            cause: source,
        }
    }

    pub(crate) fn bundle(path: impl Into<PathBuf>, what: impl Into<String>) -> Self {
        Error::Bundle {
            path: path.into(),
            what: what.into(),
        }
    }

    pub(crate) fn model(stage: &'static str, err: impl std::fmt::Display) -> Self {
        Error::Model {
            stage,
            message: format!("{err:#}"),
        }
    }
}

/// Why a network file does not fit sglora's own kernels, naming the node or tensor at fault
/// (`bert`, `cvae`, `onnx_graph`, `kernels`). The loader that knows the file wraps it into
/// [`Error::Bundle`] with the file's path and what to do instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unsupported(pub String);

impl From<&str> for Unsupported {
    fn from(s: &str) -> Self {
        Unsupported(s.to_string())
    }
}

/// `unsupported!("{name}: …")`: an [`Unsupported`] with a formatted message.
macro_rules! unsupported {
    ($($t:tt)*) => {
        $crate::error::Unsupported(format!($($t)*))
    };
}
pub(crate) use unsupported;
