//! The D-Bus interface `org.sglora.Generator1` at `/org/sglora/Generator1` (zbus).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use zbus::object_server::SignalEmitter;
use zbus::OwnedVariant as OwnedValue;

use sglora::GenerateOptions;

use crate::error::Error;
use crate::service::Service;

/// Well-known bus name.
pub const BUS_NAME: &str = "org.sglora.Generator1";
/// Object path.
pub const OBJECT_PATH: &str = "/org/sglora/Generator1";

/// Errors returned over D-Bus as `org.sglora.Generator1.Error.*`.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.sglora.Generator1.Error")]
pub enum DbusError {
    /// Transport error.
    #[zbus(error)]
    ZBus(zbus::Error),
    /// Empty, too long or otherwise unusable description.
    InvalidDescription(String),
    /// Unknown or out-of-range option.
    InvalidOption(String),
    /// No expert is close enough to the description.
    OutOfDistribution(String),
    /// The expected gain of the adapter is below the caller's `min_expected_gain`.
    LowExpectedGain(String),
    /// Too many requests queued.
    Busy(String),
    /// Unknown adapter id.
    NotFound(String),
    /// Anything else.
    Internal(String),
}

/// The one mapping of the service's errors to the wire: the error name says what kind, the
/// message says what to do.
impl From<Error> for DbusError {
    fn from(e: Error) -> Self {
        match e {
            Error::Generation(g) => match &*g {
                sglora::Error::InvalidDescription(m) => DbusError::InvalidDescription(m.clone()),
                sglora::Error::InvalidOption(m) => DbusError::InvalidOption(m.clone()),
                e @ sglora::Error::OutOfDistribution { .. } => {
                    DbusError::OutOfDistribution(e.to_string())
                }
                e @ sglora::Error::LowExpectedGain { .. } => {
                    DbusError::LowExpectedGain(e.to_string())
                }
                e => DbusError::Internal(e.to_string()),
            },
            e @ Error::Busy { .. } => DbusError::Busy(e.detail()),
            e @ Error::NotFound { .. } => DbusError::NotFound(e.detail()),
            Error::Config(m) => DbusError::InvalidOption(m),
            Error::Internal(m) => DbusError::Internal(m),
            e => DbusError::Internal(e.to_string()),
        }
    }
}

/// Parse the `a{sv}` options of `Generate`/`Explain`: `seed` (t/u/i/x ≥ 0), `top_k` (u/i/t/x),
/// `temperature`, `noise_scale`, `min_similarity`, `min_expected_gain` (d, or an integer),
/// `allow_ood` (b): the vocabulary of
/// [`GenerateOptions`], typed as D-Bus types them. Unknown keys are errors.
pub fn parse_options(opts: &HashMap<String, OwnedValue>) -> Result<GenerateOptions, Error> {
    parse(opts).map_err(|m| sglora::Error::InvalidOption(m).into())
}

fn parse(opts: &HashMap<String, OwnedValue>) -> Result<GenerateOptions, String> {
    fn int(k: &str, v: &OwnedValue) -> Result<i128, String> {
        if let Ok(x) = u64::try_from(v) {
            return Ok(i128::from(x));
        }
        if let Ok(x) = i64::try_from(v) {
            return Ok(i128::from(x));
        }
        if let Ok(x) = u32::try_from(v) {
            return Ok(i128::from(x));
        }
        if let Ok(x) = i32::try_from(v) {
            return Ok(i128::from(x));
        }
        Err(format!(
            "option {k} must be an integer (t, u, x or i), got signature {}",
            v.value_signature()
        ))
    }
    fn float(k: &str, v: &OwnedValue) -> Result<f64, String> {
        if let Ok(x) = f64::try_from(v) {
            return Ok(x);
        }
        int(k, v).map(|x| x as f64).map_err(|_| {
            format!(
                "option {k} must be a number (d), got signature {}",
                v.value_signature()
            )
        })
    }
    let mut o = GenerateOptions::default();
    for (k, v) in opts {
        match k.as_str() {
            "seed" => {
                let x = int(k, v)?;
                o.seed = u64::try_from(x).map_err(|_| format!("seed must be between 0 and {}", u64::MAX))?;
            }
            "top_k" => {
                let x = int(k, v)?;
                o.top_k = Some(usize::try_from(x).ok().filter(|x| *x >= 1).ok_or("top_k must be a positive integer")?);
            }
            "temperature" => o.temperature = Some(float(k, v)?),
            "noise_scale" => o.noise_scale = Some(float(k, v)?),
            "min_similarity" => o.min_similarity = Some(float(k, v)?),
            "min_expected_gain" => o.min_expected_gain = Some(float(k, v)?),
            "allow_ood" => o.allow_ood = bool::try_from(v).map_err(|_| "allow_ood must be a boolean (b)".to_string())?,
            other => {
                return Err(format!(
                    "unknown option {other:?}; known: seed, top_k, temperature, noise_scale, min_similarity, min_expected_gain, allow_ood"
                ))
            }
        }
    }
    Ok(o)
}

/// The emitter of signals addressed to the caller of the current method only; `None` where the
/// call has no sender to address (a peer-to-peer connection), so nothing is ever broadcast.
fn to_caller<'s>(
    emitter: SignalEmitter<'s>,
    header: &zbus::message::Header<'_>,
) -> Option<SignalEmitter<'s>> {
    let sender = header.sender()?.to_owned();
    Some(emitter.set_destination(zbus::names::BusName::Unique(sender)))
}

/// The exported object.
pub struct Generator1 {
    svc: Arc<Service>,
}

impl Generator1 {
    /// Wrap the service.
    pub fn new(svc: Arc<Service>) -> Self {
        Generator1 { svc }
    }
}

#[zbus::interface(name = "org.sglora.Generator1")]
impl Generator1 {
    /// Generate (or fetch from the cache) an adapter for a description.
    ///
    /// `AdapterReady` / `GenerationFailed` go to the caller alone (unicast signals): a
    /// description is the caller's private data, and nobody else on the bus learns it, nor which
    /// adapters another caller was handed.
    #[zbus(out_args("adapter_dir", "adapter_id", "cache_hit", "provenance_json"))]
    async fn generate(
        &self,
        description: String,
        options: HashMap<String, OwnedValue>,
        #[zbus(header)] header: zbus::message::Header<'_>,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<(String, String, bool, String), DbusError> {
        let emitter = to_caller(emitter, &header);
        let opts = match parse(&options) {
            Ok(o) => o,
            Err(m) => {
                if let Some(emitter) = &emitter {
                    let _ = Self::generation_failed(emitter, &description, &m).await;
                }
                return Err(DbusError::InvalidOption(m));
            }
        };
        match self.svc.generate(&description, &opts).await {
            Ok(s) => {
                let dir = s.entry.dir.to_string_lossy().into_owned();
                if let Some(emitter) = &emitter {
                    let _ = Self::adapter_ready(emitter, &s.entry.id, &dir).await;
                }
                Ok((dir, s.entry.id, s.cache_hit, s.entry.provenance))
            }
            Err(e) => {
                if let Some(emitter) = &emitter {
                    let _ = Self::generation_failed(emitter, &description, &e.to_string()).await;
                }
                Err(e.into())
            }
        }
    }

    /// Retrieval only: (expert name, similarity, weight), most similar first.
    async fn explain(
        &self,
        description: String,
        options: HashMap<String, OwnedValue>,
    ) -> Result<Vec<(String, f64, f64)>, DbusError> {
        let opts = parse_options(&options)?;
        let ex = self.svc.explain(&description, &opts).await?;
        Ok(ex
            .experts
            .into_iter()
            .map(|e| (e.name, e.similarity, e.weight))
            .collect())
    }

    /// The whole explanation as JSON, what `sglora explain --json` prints: the experts with
    /// their scores and weights, `best_similarity`, `out_of_distribution`, the `expected_gain`
    /// (estimate and interval, R@1 points), the resolved options and timings. `Explain` keeps
    /// its `a(sdd)` signature for existing clients.
    async fn explain_json(
        &self,
        description: String,
        options: HashMap<String, OwnedValue>,
    ) -> Result<String, DbusError> {
        let opts = parse_options(&options)?;
        let ex = self.svc.explain(&description, &opts).await?;
        serde_json::to_string(&ex)
            .map_err(|e| DbusError::Internal(format!("serialising the explanation: {e}")))
    }

    /// The expert repository: (name, description).
    async fn list_experts(&self) -> Vec<(String, String)> {
        self.svc
            .generator()
            .experts()
            .metas()
            .iter()
            .map(|m| (m.name.clone(), m.description.clone()))
            .collect()
    }

    /// A cached adapter: (adapter_dir, provenance_json).
    #[zbus(out_args("adapter_dir", "provenance_json"))]
    async fn get_adapter(&self, id: String) -> Result<(String, String), DbusError> {
        let e = self.svc.get(&id)?;
        Ok((e.dir.to_string_lossy().into_owned(), e.provenance))
    }

    /// Remove an adapter from the cache; false if it was not there.
    async fn evict(&self, id: String) -> Result<bool, DbusError> {
        Ok(self.svc.evict(&id)?)
    }

    /// Re-read the bundle (expert repository and models) from disk without a restart; returns
    /// the number of experts. A bundle that fails verification leaves the old one in service.
    async fn reload_experts(&self) -> Result<u32, DbusError> {
        Ok(self.svc.reload().await? as u32)
    }

    /// sglora version.
    #[zbus(property(emits_changed_signal = "const"))]
    fn version(&self) -> String {
        env!("CARGO_PKG_VERSION").to_string()
    }

    /// Bundle id of the loaded bundle.
    #[zbus(property(emits_changed_signal = "false"))]
    fn bundle_id(&self) -> String {
        self.svc.generator().bundle().manifest.bundle_id.clone()
    }

    /// Cached adapters.
    #[zbus(property(emits_changed_signal = "false"))]
    fn cache_entries(&self) -> u64 {
        self.svc.cache_stats().entries
    }

    /// Bytes of cached adapters.
    #[zbus(property(emits_changed_signal = "false"))]
    fn cache_bytes(&self) -> u64 {
        self.svc.cache_stats().bytes
    }

    /// Requests now queued or running in the compute stage (0 when idle).
    #[zbus(property(emits_changed_signal = "false"))]
    fn pending(&self) -> u64 {
        self.svc.pending().0 as u64
    }

    /// Successful Generate requests.
    #[zbus(property(emits_changed_signal = "false"))]
    fn requests_served(&self) -> u64 {
        self.svc.counters.served.load(Ordering::Relaxed)
    }

    /// Generations actually run (cache misses that produced an adapter).
    #[zbus(property(emits_changed_signal = "false"))]
    fn generations_run(&self) -> u64 {
        self.svc.counters.generated.load(Ordering::Relaxed)
    }

    /// Share of served requests answered from the cache.
    #[zbus(property(emits_changed_signal = "false"))]
    fn cache_hit_ratio(&self) -> f64 {
        let served = self.svc.counters.served.load(Ordering::Relaxed);
        if served == 0 {
            0.0
        } else {
            self.svc.counters.hits.load(Ordering::Relaxed) as f64 / served as f64
        }
    }

    /// An adapter is ready: sent to the caller of `Generate` only, never broadcast.
    #[zbus(signal)]
    async fn adapter_ready(emitter: &SignalEmitter<'_>, id: &str, dir: &str) -> zbus::Result<()>;

    /// A request failed: sent to the caller of `Generate` only, never broadcast.
    #[zbus(signal)]
    async fn generation_failed(
        emitter: &SignalEmitter<'_>,
        request: &str,
        error: &str,
    ) -> zbus::Result<()>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use zbus::Variant as Value;

    fn map(items: Vec<(&str, Value<'static>)>) -> HashMap<String, OwnedValue> {
        items
            .into_iter()
            .map(|(k, v)| (k.to_string(), OwnedValue::try_from(v).unwrap()))
            .collect()
    }

    #[test]
    fn options_parse_and_reject() {
        let o = parse_options(&map(vec![
            ("seed", Value::U64(7)),
            ("top_k", Value::I32(3)),
            ("allow_ood", Value::Bool(true)),
        ]))
        .unwrap();
        assert_eq!((o.seed, o.top_k, o.allow_ood), (7, Some(3), true));
        let err = |items| parse_options(&map(items)).unwrap_err().to_string();
        assert!(err(vec![("seed", Value::I64(-1))]).contains("seed"));
        assert!(err(vec![("top_k", Value::I32(-2))]).contains("top_k"));
        assert!(err(vec![("top_k", Value::from("three"))]).contains("integer"));
        assert!(err(vec![("colour", Value::Bool(true))]).contains("unknown option"));
        assert_eq!(
            parse_options(&map(vec![("temperature", Value::F64(0.5))]))
                .unwrap()
                .temperature,
            Some(0.5)
        );
        let gain = |v| parse_options(&map(vec![("min_expected_gain", v)]));
        assert_eq!(gain(Value::F64(2.5)).unwrap().min_expected_gain, Some(2.5));
        assert_eq!(gain(Value::U32(3)).unwrap().min_expected_gain, Some(3.0));
        let e = gain(Value::from("3")).unwrap_err().to_string();
        assert!(
            e.contains("min_expected_gain") && e.contains("number"),
            "{e}"
        );
    }

    #[test]
    fn a_low_expected_gain_has_its_own_error_name() {
        let e = DbusError::from(Error::from(sglora::Error::LowExpectedGain {
            estimate: 1.0,
            low: -1.0,
            high: 3.0,
            threshold: 2.0,
        }));
        assert!(
            matches!(&e, DbusError::LowExpectedGain(m) if m.contains("min_expected_gain")),
            "{e:?}"
        );
        assert_eq!(
            zbus::DBusError::name(&e).as_str(),
            "org.sglora.Generator1.Error.LowExpectedGain"
        );
    }
}
