//! The D-Bus interfaces at `/org/sglora/Generator1` (zbus): `org.sglora.Generator1` for every
//! caller the bus policy admits, `org.sglora.Admin1` for root and the service user.
//!
//! This is the one place that knows the wire: who the caller is (the bus says, by
//! `GetConnectionUnixUser`), how options are typed, how errors are named. Arguments are bounded
//! while they are decoded (options at most [`MAX_OPTIONS`] keys, a description at most 64 KiB
//! before the library's own limit), so an oversized call is refused before it is held in memory
//! as a map or a string: the message itself is all it costs (the bus bounds its size).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use zbus::object_server::SignalEmitter;
use zbus::OwnedVariant as OwnedValue;

use sglora::GenerateOptions;

use crate::config::{MAX_EMBED_BYTES, MAX_EMBED_TEXTS};
use crate::error::Error;
use crate::service::{Caller, Service};

/// Well-known bus name.
pub const BUS_NAME: &str = "org.sglora.Generator1";
/// Object path.
pub const OBJECT_PATH: &str = "/org/sglora/Generator1";
/// The administrator's interface (same object).
pub const ADMIN_INTERFACE: &str = "org.sglora.Admin1";
/// Most keys an options dictionary may have (seven are known; the rest is room for clients
/// that send a few extra and get a clear error naming them).
pub const MAX_OPTIONS: usize = 32;
/// The option names `parse` knows, for error messages.
const KNOWN_OPTIONS: &str =
    "seed, top_k, temperature, noise_scale, min_similarity, min_expected_gain, allow_ood";
/// Longest option name.
const MAX_OPTION_NAME: usize = 64;

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
    /// No cached adapter of the caller's has this id.
    NotFound(String),
    /// An argument past a limit, or unusable: too many texts or bytes for `Embed`, an empty or
    /// too long text.
    InvalidArgument(String),
    /// A cached adapter's files were changed or damaged on disk; it has been removed.
    Damaged(String),
    /// An expert cannot be added or removed: its name is in use or unknown, it is shipped with
    /// the bundle, or its projection onto the shared LoRA A loses too much.
    ExpertRefused(String),
    /// The caller may not call this method (an administrator's).
    AccessDenied(String),
    /// The service is stopping and takes no new work.
    Stopping(String),
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
                sglora::Error::InvalidText(m) => DbusError::InvalidArgument(m.clone()),
                e
                @ (sglora::Error::OutOfDistribution { .. } | sglora::Error::OutOfScope { .. }) => {
                    DbusError::OutOfDistribution(e.to_string())
                }
                e @ sglora::Error::LowExpectedGain { .. } => {
                    DbusError::LowExpectedGain(e.to_string())
                }
                sglora::Error::Expert(m) => DbusError::ExpertRefused(m.clone()),
                e @ sglora::Error::Adapter { .. } => DbusError::InvalidArgument(e.to_string()),
                e => DbusError::Internal(e.to_string()),
            },
            e @ (Error::Busy { .. } | Error::CallerBusy { .. }) => DbusError::Busy(e.detail()),
            e @ Error::NotFound { .. } => DbusError::NotFound(e.detail()),
            e @ Error::Damaged { .. } => DbusError::Damaged(e.detail()),
            Error::TooLarge(m) => DbusError::InvalidArgument(m),
            e @ Error::Stopping => DbusError::Stopping(e.to_string()),
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
                o.seed = u64::try_from(x)
                    .map_err(|_| format!("seed must be between 0 and {}", u64::MAX))?;
            }
            "top_k" => {
                let x = int(k, v)?;
                o.top_k = Some(
                    usize::try_from(x)
                        .ok()
                        .filter(|x| *x >= 1)
                        .ok_or("top_k must be a positive integer")?,
                );
            }
            "temperature" => o.temperature = Some(float(k, v)?),
            "noise_scale" => o.noise_scale = Some(float(k, v)?),
            "min_similarity" => o.min_similarity = Some(float(k, v)?),
            "min_expected_gain" => o.min_expected_gain = Some(float(k, v)?),
            "allow_ood" => {
                o.allow_ood =
                    bool::try_from(v).map_err(|_| "allow_ood must be a boolean (b)".to_string())?
            }
            other => return Err(format!("unknown option {other:?}; known: {KNOWN_OPTIONS}")),
        }
    }
    Ok(o)
}

/// An `a{sv}` options argument, decoded up to [`MAX_OPTIONS`] keys of at most 64 bytes: past
/// that, the rest is skipped unread and the call is refused with `InvalidOption` (so a call
/// with 500,000 keys costs no more memory than its message).
#[derive(Debug, Default)]
pub struct Options {
    /// The options, when within the bounds.
    pub map: HashMap<String, OwnedValue>,
    /// Why they were not decoded (too many keys, or too long a name).
    pub refused: Option<String>,
}

impl Options {
    fn parse(&self) -> Result<GenerateOptions, String> {
        match &self.refused {
            Some(m) => Err(m.clone()),
            None => parse(&self.map),
        }
    }
}

impl zbus::zvariant::Type for Options {
    const SIGNATURE: &'static zbus::Signature =
        <HashMap<String, OwnedValue> as zbus::zvariant::Type>::SIGNATURE;
}

impl<'de> serde::Deserialize<'de> for Options {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Options;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "an options dictionary a{{sv}}")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<Options, A::Error> {
                use serde::de::IgnoredAny;
                let mut out = Options::default();
                let mut seen = 0usize;
                while let Some(k) = m.next_key::<Bounded<MAX_OPTION_NAME>>()? {
                    seen += 1;
                    if out.refused.is_some() {
                        m.next_value::<IgnoredAny>()?;
                        continue;
                    }
                    match k.0 {
                        Ok(k) if seen <= MAX_OPTIONS => match m.next_value::<Scalar>()?.0 {
                            Ok(v) => {
                                out.map.insert(k, v);
                            }
                            Err(sig) => {
                                out.map.clear();
                                out.refused = Some(format!(
                                    "option {k} must be a number, a boolean or a short string; \
                                     got a value of signature {sig}"
                                ));
                            }
                        },
                        Ok(_) => {
                            m.next_value::<IgnoredAny>()?;
                            out.map.clear();
                            out.refused = Some(format!(
                                "more than {MAX_OPTIONS} options; known: {KNOWN_OPTIONS}"
                            ));
                        }
                        Err(n) => {
                            m.next_value::<IgnoredAny>()?;
                            out.map.clear();
                            out.refused = Some(format!(
                                "an option name is {n} bytes; unknown option (known: {KNOWN_OPTIONS})"
                            ));
                        }
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_map(V)
    }
}

/// One option's value: a basic type (b, y, n, q, i, u, x, t, d, or a string of at most 256
/// bytes), or, for anything else, its signature, the value itself skipped unread (a variant
/// holding a 30 MB array costs nothing beyond its message).
struct Scalar(Result<OwnedValue, String>);

impl<'de> serde::Deserialize<'de> for Scalar {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "a variant")
            }
            // A variant is (signature, value) to the decoder.
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Scalar, A::Error> {
                use serde::de::Error as _;
                let sig: zbus::Signature = a
                    .next_element()?
                    .ok_or_else(|| A::Error::custom("a variant without a signature"))?;
                let sig = sig.to_string();
                let missing = || A::Error::custom("a variant without a value");
                let v = |x: zbus::Variant<'static>| {
                    OwnedValue::try_from(x).map_err(|e| A::Error::custom(e.to_string()))
                };
                let value = match sig.as_str() {
                    "b" => v(a.next_element::<bool>()?.ok_or_else(missing)?.into())?,
                    "y" => v(a.next_element::<u8>()?.ok_or_else(missing)?.into())?,
                    "n" => v(a.next_element::<i16>()?.ok_or_else(missing)?.into())?,
                    "q" => v(a.next_element::<u16>()?.ok_or_else(missing)?.into())?,
                    "i" => v(a.next_element::<i32>()?.ok_or_else(missing)?.into())?,
                    "u" => v(a.next_element::<u32>()?.ok_or_else(missing)?.into())?,
                    "x" => v(a.next_element::<i64>()?.ok_or_else(missing)?.into())?,
                    "t" => v(a.next_element::<u64>()?.ok_or_else(missing)?.into())?,
                    "d" => v(a.next_element::<f64>()?.ok_or_else(missing)?.into())?,
                    "s" => match a.next_element::<Bounded<256>>()?.ok_or_else(missing)?.0 {
                        Ok(s) => v(zbus::Variant::from(s))?,
                        Err(n) => return Ok(Scalar(Err(format!("s ({n} bytes)")))),
                    },
                    _ => {
                        a.next_element::<serde::de::IgnoredAny>()?;
                        return Ok(Scalar(Err(sig)));
                    }
                };
                Ok(Scalar(Ok(value)))
            }
        }
        d.deserialize_any(V)
    }
}

/// A string argument of at most `N` bytes, or the length of one that was longer (which is not
/// copied out of the message).
#[derive(Debug)]
pub struct Bounded<const N: usize>(pub Result<String, usize>);

/// A description argument: decoded up to 64 KiB (the library then trims it and applies its own
/// limit of [`sglora::MAX_DESCRIPTION_BYTES`]); past that it is refused unread.
pub type Text = Bounded<65536>;

impl<const N: usize> Bounded<N> {
    /// The string, or `refuse(length)`'s error for one past the bound.
    fn take<E>(self, refuse: impl FnOnce(usize) -> E) -> Result<String, E> {
        self.0.map_err(refuse)
    }
}

impl<const N: usize> zbus::zvariant::Type for Bounded<N> {
    const SIGNATURE: &'static zbus::Signature = <String as zbus::zvariant::Type>::SIGNATURE;
}

impl<'de, const N: usize> serde::Deserialize<'de> for Bounded<N> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<const N: usize>;
        impl<const N: usize> serde::de::Visitor<'_> for V<N> {
            type Value = Bounded<N>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "a string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Bounded<N>, E> {
                Ok(Bounded(if v.len() > N {
                    Err(v.len())
                } else {
                    Ok(v.to_owned())
                }))
            }
        }
        d.deserialize_str(V::<N>)
    }
}

/// The texts of `Embed`: decoded up to [`MAX_EMBED_TEXTS`] strings of at most
/// [`sglora::MAX_TEXT_BYTES`] and [`MAX_EMBED_BYTES`] in all; past any bound the rest is skipped
/// unread and the call refused (`InvalidArgument`), so 100,000 texts cost no more memory than
/// their message. The configured `[embed]` limits, lower, are the service's to check.
#[derive(Debug, Default)]
pub struct Texts {
    /// The texts, when within the bounds.
    pub texts: Vec<String>,
    /// Why they were not decoded.
    pub refused: Option<String>,
}

impl zbus::zvariant::Type for Texts {
    const SIGNATURE: &'static zbus::Signature = <Vec<String> as zbus::zvariant::Type>::SIGNATURE;
}

impl<'de> serde::Deserialize<'de> for Texts {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Texts;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "an array of strings")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Texts, A::Error> {
                let mut out = Texts::default();
                let (mut n, mut bytes) = (0usize, 0usize);
                while let Some(t) = a.next_element::<Bounded<{ sglora::MAX_TEXT_BYTES }>>()? {
                    n += 1;
                    if out.refused.is_some() {
                        continue;
                    }
                    let refuse = match t.0 {
                        Err(len) => Some(format!(
                            "text {} is {len} bytes long; the limit is {} bytes (the encoder \
                             reads only its first 128 tokens, so cut it to those)",
                            n - 1,
                            sglora::MAX_TEXT_BYTES
                        )),
                        Ok(_) if n > MAX_EMBED_TEXTS => Some(format!(
                            "more than {MAX_EMBED_TEXTS} texts in one call: split them"
                        )),
                        Ok(t) => {
                            bytes += t.len();
                            if bytes > MAX_EMBED_BYTES {
                                Some(format!(
                                    "more than {MAX_EMBED_BYTES} bytes of text in one call: split them"
                                ))
                            } else {
                                out.texts.push(t);
                                None
                            }
                        }
                    };
                    if refuse.is_some() {
                        out.texts = Vec::new();
                        out.refused = refuse;
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_seq(V)
    }
}

/// The description argument, or the library's own refusal of one past the byte limit.
fn description_arg(t: Text) -> Result<String, DbusError> {
    t.take(|n| {
        DbusError::InvalidDescription(format!(
            "it is {n} bytes long; the limit is {} bytes (a task description is a sentence or two)",
            sglora::MAX_DESCRIPTION_BYTES
        ))
    })
}

/// The contents of a file passed as a descriptor: a regular file of at most `max` bytes.
fn read_fd(fd: zbus::OwnedFd, what: &str, max: u64) -> Result<Vec<u8>, DbusError> {
    use std::io::Read;
    let file = std::fs::File::from(std::os::fd::OwnedFd::from(fd));
    let meta = file
        .metadata()
        .map_err(|e| DbusError::InvalidArgument(format!("{what}: cannot read it: {e}")))?;
    if !meta.is_file() {
        return Err(DbusError::InvalidArgument(format!(
            "{what}: the descriptor is not a regular file"
        )));
    }
    let mut bytes = Vec::new();
    (&file)
        .take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| DbusError::InvalidArgument(format!("{what}: cannot read it: {e}")))?;
    if bytes.len() as u64 > max {
        return Err(DbusError::InvalidArgument(format!(
            "{what} is more than {max} bytes"
        )));
    }
    Ok(bytes)
}

/// An id argument (ids are 24 hex digits; a longer string is no id of anyone's).
fn id_arg(id: Bounded<64>) -> String {
    id.0.unwrap_or_default()
}

/// Who called: the bus's word for the uid behind the sender's connection, remembered per
/// unique name (never reused on a bus) in a bounded map; on a peer-to-peer connection, the
/// peer's credentials.
#[derive(Debug, Default)]
pub struct Callers {
    known: Mutex<HashMap<String, u32>>,
}

impl Callers {
    const KEEP: usize = 4096;

    async fn of(
        &self,
        conn: &zbus::Connection,
        header: &zbus::message::Header<'_>,
    ) -> Result<Caller, DbusError> {
        let unknown =
            |e: zbus::Error| DbusError::AccessDenied(format!("cannot tell who the caller is: {e}"));
        let Some(sender) = header.sender() else {
            let creds = conn
                .peer_creds()
                .await
                .map_err(|e| unknown(zbus::Error::InputOutput(Arc::new(e))))?;
            return creds
                .unix_user_id()
                .map(Caller::uid)
                .ok_or_else(|| DbusError::AccessDenied("the peer has no uid".into()));
        };
        let name = sender.as_str().to_string();
        if let Some(uid) = self
            .known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&name)
        {
            return Ok(Caller::uid(*uid));
        }
        let uid = zbus::fdo::DBusProxy::new(conn)
            .await
            .map_err(unknown)?
            .get_connection_unix_user(zbus::names::BusName::Unique(sender.to_owned()))
            .await
            .map_err(|e| unknown(e.into()))?;
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        if known.len() >= Self::KEEP {
            known.clear();
        }
        known.insert(name, uid);
        Ok(Caller::uid(uid))
    }
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

/// The exported object's caller interface.
pub struct Generator1 {
    svc: Arc<Service>,
    callers: Arc<Callers>,
}

impl Generator1 {
    /// Wrap the service.
    pub fn new(svc: Arc<Service>, callers: Arc<Callers>) -> Self {
        Generator1 { svc, callers }
    }
}

/// The files of an adapter opened read-only, by file name.
fn open_files(dir: &std::path::Path) -> Result<HashMap<String, zbus::OwnedFd>, DbusError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut out = HashMap::new();
    for name in [
        sglora::WEIGHTS_FILE,
        sglora::CONFIG_FILE,
        sglora::PROVENANCE_FILE,
    ] {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
            .open(dir.join(name))
            .map_err(|e| DbusError::Internal(format!("opening the adapter's {name}: {e}")))?;
        out.insert(
            name.to_string(),
            zbus::OwnedFd::from(std::os::fd::OwnedFd::from(f)),
        );
    }
    Ok(out)
}

#[zbus::interface(name = "org.sglora.Generator1")]
impl Generator1 {
    /// Generate (or fetch from the cache) an adapter for a description.
    ///
    /// `AdapterReady` / `GenerationFailed` go to the caller alone (unicast signals): a
    /// description is the caller's private data, and nobody else on the bus learns it, nor which
    /// adapters another caller was handed.
    #[zbus(out_args("adapter_dir", "adapter_id", "cache_hit", "provenance_json"))]
    ///
    /// `adapter_dir` is readable by root and the service user only; other callers get the
    /// files with `OpenAdapter(adapter_id)`.
    async fn generate(
        &self,
        description: Text,
        options: Options,
        #[zbus(header)] header: zbus::message::Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<(String, String, bool, String), DbusError> {
        let caller = self.callers.of(conn, &header).await?;
        let emitter = to_caller(emitter, &header);
        let description = match description_arg(description) {
            Ok(d) => d,
            Err(e) => {
                if let Some(emitter) = &emitter {
                    let _ = Self::generation_failed(emitter, "", &e.to_string()).await;
                }
                return Err(e);
            }
        };
        let opts = match options.parse() {
            Ok(o) => o,
            Err(m) => {
                if let Some(emitter) = &emitter {
                    let _ = Self::generation_failed(emitter, &description, &m).await;
                }
                return Err(DbusError::InvalidOption(m));
            }
        };
        match self.svc.generate(&description, &opts, caller).await {
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
        description: Text,
        options: Options,
        #[zbus(header)] header: zbus::message::Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<Vec<(String, f64, f64)>, DbusError> {
        let caller = self.callers.of(conn, &header).await?;
        let description = description_arg(description)?;
        let opts = options
            .parse()
            .map_err(|m| Error::from(sglora::Error::InvalidOption(m)))?;
        let ex = self.svc.explain(&description, &opts, caller).await?;
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
        description: Text,
        options: Options,
        #[zbus(header)] header: zbus::message::Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<String, DbusError> {
        let caller = self.callers.of(conn, &header).await?;
        let description = description_arg(description)?;
        let opts = options
            .parse()
            .map_err(|m| Error::from(sglora::Error::InvalidOption(m)))?;
        let ex = self.svc.explain(&description, &opts, caller).await?;
        serde_json::to_string(&ex)
            .map_err(|e| DbusError::Internal(format!("serialising the explanation: {e}")))
    }

    /// Embed `texts` with the bundle's encoder and one of the caller's cached adapters applied
    /// (`adapter_id` from `Generate`; empty: the base model), as `sglora embed` does: `dim` and
    /// the L2-normalised vectors as little-endian f32, row-major, in input order
    /// (`texts.len() × dim × 4` bytes). Bounded by `[embed] max_texts` and `max_bytes`
    /// (`InvalidArgument` past them, or for an empty text); `Busy` as `Generate`; another
    /// caller's adapter is `NotFound`; one whose files were damaged is `Damaged`. `options`
    /// must be empty (room for later options).
    #[zbus(out_args("dim", "vectors"))]
    async fn embed(
        &self,
        adapter_id: Bounded<64>,
        texts: Texts,
        options: Options,
        #[zbus(header)] header: zbus::message::Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<(u32, Vec<u8>), DbusError> {
        let caller = self.callers.of(conn, &header).await?;
        if let Some(m) = texts.refused {
            return Err(DbusError::InvalidArgument(m));
        }
        if let Some(m) = options.refused {
            return Err(DbusError::InvalidOption(m));
        }
        if let Some(k) = options.map.keys().next() {
            return Err(DbusError::InvalidOption(format!(
                "unknown option {k:?}; Embed takes no options"
            )));
        }
        let id = match adapter_id.0 {
            Ok(id) => id,
            Err(_) => {
                return Err(Error::NotFound {
                    id: "(too long)".into(),
                }
                .into())
            }
        };
        let (dim, vectors) = self.svc.embed(&id, texts.texts, caller).await?;
        Ok((
            u32::try_from(dim).unwrap_or(u32::MAX),
            sglora::f32s_to_le(&vectors),
        ))
    }

    /// The expert repository: (name, description, origin), origin `bundle` for a shipped
    /// expert and `added` for one added on the device (`AddExpert`, `sglora experts add`).
    async fn list_experts(&self) -> Vec<(String, String, String)> {
        self.svc
            .current()
            .await
            .experts()
            .metas()
            .iter()
            .map(|m| {
                (
                    m.name.clone(),
                    m.description.clone(),
                    m.origin().to_string(),
                )
            })
            .collect()
    }

    /// One of the caller's cached adapters: (adapter_dir, provenance_json). Another caller's
    /// adapter is `NotFound`, as if it did not exist.
    #[zbus(out_args("adapter_dir", "provenance_json"))]
    async fn get_adapter(
        &self,
        id: Bounded<64>,
        #[zbus(header)] header: zbus::message::Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<(String, String), DbusError> {
        let caller = self.callers.of(conn, &header).await?;
        let e = self.svc.get(&id_arg(id), caller)?;
        Ok((e.dir.to_string_lossy().into_owned(), e.provenance))
    }

    /// One of the caller's adapters as read-only file descriptors, by file name
    /// (`adapter_config.json`, `adapter_model.safetensors`, `provenance.json`): the cache stays
    /// private to the service, and the caller needs no access to it. Another caller's adapter
    /// is `NotFound`.
    async fn open_adapter(
        &self,
        id: Bounded<64>,
        #[zbus(header)] header: zbus::message::Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<HashMap<String, zbus::OwnedFd>, DbusError> {
        let caller = self.callers.of(conn, &header).await?;
        let e = self.svc.get(&id_arg(id), caller)?;
        open_files(&e.dir)
    }

    /// One of the caller's adapters exported for another runtime, as a read-only file
    /// descriptor of a file with no name (`sglora export` without the files): `format`
    /// `onnx-merged` (fp32, ~55 MB) or `onnx-merged-int8` (~24 MB), an ONNX encoder with the
    /// adapter folded in, inputs `input_ids`, `attention_mask`, output `last_hidden_state`; or
    /// `onnx-adapter` (~300 KB), onnxruntime's adapter file for the slotted base encoder
    /// (`sglora export --base-slotted`).
    /// `NotFound`, `Damaged`, `Busy` as `Embed`; an unknown format is `InvalidOption`.
    async fn export(
        &self,
        id: Bounded<64>,
        format: Bounded<64>,
        #[zbus(header)] header: zbus::message::Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<zbus::OwnedFd, DbusError> {
        let caller = self.callers.of(conn, &header).await?;
        let format = format.0.unwrap_or_default();
        let f = self.svc.export(&id_arg(id), &format, caller).await?;
        Ok(zbus::OwnedFd::from(std::os::fd::OwnedFd::from(f)))
    }

    /// Remove one of the caller's adapters from the cache; false if the caller has none with
    /// this id (another caller's is not touched: the administrator's `Evict` removes any).
    async fn evict(
        &self,
        id: Bounded<64>,
        #[zbus(header)] header: zbus::message::Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<bool, DbusError> {
        let caller = self.callers.of(conn, &header).await?;
        Ok(self.svc.evict(&id_arg(id), caller)?)
    }

    /// sglora version.
    #[zbus(property(emits_changed_signal = "const"))]
    fn version(&self) -> String {
        env!("CARGO_PKG_VERSION").to_string()
    }

    /// Bundle id of the loaded bundle.
    #[zbus(property)]
    fn bundle_id(&self) -> String {
        self.svc.generator().bundle().manifest.bundle_id.clone()
    }

    /// Cached adapters.
    #[zbus(property)]
    fn cache_entries(&self) -> u64 {
        self.svc.cache_stats().entries
    }

    /// Bytes of cached adapters.
    #[zbus(property)]
    fn cache_bytes(&self) -> u64 {
        self.svc.cache_stats().bytes
    }

    /// Requests now queued or running in the compute stage (0 when idle).
    #[zbus(property)]
    fn pending(&self) -> u64 {
        self.svc.pending().0 as u64
    }

    /// Successful Generate requests.
    #[zbus(property)]
    fn requests_served(&self) -> u64 {
        self.svc.counters.served.load(Ordering::Relaxed)
    }

    /// Generations actually run (cache misses that produced an adapter).
    #[zbus(property)]
    fn generations_run(&self) -> u64 {
        self.svc.counters.generated.load(Ordering::Relaxed)
    }

    /// Share of served requests answered from the cache.
    #[zbus(property)]
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

/// The administrator's interface, `org.sglora.Admin1` on the same object: the shipped policy
/// lets only root and the service user call it, and each method checks the caller again.
pub struct Admin1 {
    svc: Arc<Service>,
    callers: Arc<Callers>,
}

impl Admin1 {
    /// Wrap the service.
    pub fn new(svc: Arc<Service>, callers: Arc<Callers>) -> Self {
        Admin1 { svc, callers }
    }

    async fn admin(
        &self,
        conn: &zbus::Connection,
        header: &zbus::message::Header<'_>,
    ) -> Result<Caller, DbusError> {
        let caller = self.callers.of(conn, header).await?;
        if caller.is_admin() {
            Ok(caller)
        } else {
            Err(DbusError::AccessDenied(format!(
                "{ADMIN_INTERFACE} is for root and the service user; uid {} is neither",
                caller.uid
            )))
        }
    }
}

#[zbus::interface(name = "org.sglora.Admin1")]
impl Admin1 {
    /// Remove any adapter from the cache; false if it was not there.
    async fn evict(
        &self,
        id: Bounded<64>,
        #[zbus(header)] header: zbus::message::Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<bool, DbusError> {
        self.admin(conn, &header).await?;
        Ok(self.svc.evict_any(&id_arg(id))?)
    }

    /// Re-read the bundle (expert repository and models) from disk without a restart; returns
    /// the number of experts. A bundle that fails verification leaves the old one in service.
    /// Reloads run one at a time; one asked for during another returns that one's result.
    async fn reload_experts(
        &self,
        #[zbus(header)] header: zbus::message::Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(object_server)] server: &zbus::ObjectServer,
    ) -> Result<u32, DbusError> {
        self.admin(conn, &header).await?;
        let n = self.svc.reload().await? as u32;
        if let Ok(iface) = server.interface::<_, Generator1>(OBJECT_PATH).await {
            let _ = iface
                .get()
                .await
                .bundle_id_changed(iface.signal_emitter())
                .await;
        }
        Ok(n)
    }

    /// Add a PEFT LoRA adapter as an expert, at once and across restarts (the overlay in the
    /// state directory): `config` and `weights` are read-only descriptors of its
    /// `adapter_config.json` and `adapter_model.safetensors` (so the service needs no access
    /// to the caller's files), `name` unique, `descriptions` one or more wordings of its task
    /// (each a retrieval key); options `relation` (s) and `max_projection_error` (d, 0-1,
    /// default 0.1). Returns (name, relative projection error, experts now). An adapter for
    /// another base model, modules or shapes is `InvalidArgument`; a name in use or a
    /// projection that loses more than the limit is `ExpertRefused`.
    // The D-Bus signature is (h, h, s, as, a{sv}); header and connection are zbus's.
    #[allow(clippy::too_many_arguments)]
    async fn add_expert(
        &self,
        config: zbus::OwnedFd,
        weights: zbus::OwnedFd,
        name: Bounded<256>,
        descriptions: Texts,
        options: Options,
        #[zbus(header)] header: zbus::message::Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<(String, f64, u32), DbusError> {
        let caller = self.admin(conn, &header).await?;
        let name = name.take(|n| {
            DbusError::InvalidArgument(format!(
                "the name is {n} bytes long; the limit is {} bytes",
                sglora::MAX_EXPERT_NAME_BYTES
            ))
        })?;
        if let Some(m) = descriptions.refused {
            return Err(DbusError::InvalidArgument(m));
        }
        if let Some(m) = options.refused {
            return Err(DbusError::InvalidOption(m));
        }
        let mut relation = String::new();
        let mut max_projection_error = sglora::MAX_PROJECTION_ERROR;
        for (k, v) in &options.map {
            match k.as_str() {
                "relation" => {
                    relation = String::try_from(v.try_clone()?).map_err(|_| {
                        DbusError::InvalidOption("option relation must be a string (s)".into())
                    })?
                }
                "max_projection_error" => {
                    max_projection_error = f64::try_from(v).map_err(|_| {
                        DbusError::InvalidOption(
                            "option max_projection_error must be a number (d)".into(),
                        )
                    })?
                }
                other => {
                    return Err(DbusError::InvalidOption(format!(
                        "unknown option {other:?} (AddExpert takes relation and \
                         max_projection_error)"
                    )))
                }
            }
        }
        let config = read_fd(config, "adapter_config.json", 1 << 20)?;
        let weights = read_fd(
            weights,
            "adapter_model.safetensors",
            sglora::MAX_ADAPTER_BYTES,
        )?;
        let req = sglora::AddExpert {
            name,
            descriptions: descriptions.texts,
            relation,
            domain: String::new(),
            max_projection_error,
            source: format!("AddExpert by uid {}", caller.uid),
        };
        let added = self.svc.add_expert(config, weights, req).await?;
        Ok((
            added.name,
            added.projection_error,
            u32::try_from(added.experts).unwrap_or(u32::MAX),
        ))
    }

    /// Remove an added expert; returns the number of experts now. A shipped expert or an
    /// unknown name is `ExpertRefused`.
    async fn remove_expert(
        &self,
        name: Bounded<256>,
        #[zbus(header)] header: zbus::message::Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<u32, DbusError> {
        self.admin(conn, &header).await?;
        let name =
            name.take(|n| DbusError::ExpertRefused(format!("no expert has a name of {n} bytes")))?;
        let n = self.svc.remove_expert(name).await?;
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }

    /// Every cached adapter: (id, owner uid, bytes, last used in ms since the epoch, hits),
    /// most recently used first. Descriptions are not listed.
    async fn list_adapters(
        &self,
        #[zbus(header)] header: zbus::message::Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<Vec<crate::cache::Listed>, DbusError> {
        self.admin(conn, &header).await?;
        Ok(self.svc.list()?)
    }
}

/// Emit `PropertiesChanged` for the counters that changed, at most once per `every`, until
/// `stop` fires: clients watch the service without polling, and a burst of requests costs one
/// signal per interval, not one per request.
pub async fn notify_properties(
    conn: zbus::Connection,
    every: std::time::Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let Ok(iface) = conn
        .object_server()
        .interface::<_, Generator1>(OBJECT_PATH)
        .await
    else {
        return;
    };
    let mut last: Option<[u64; 6]> = None;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        let g = iface.get().await;
        let now = [
            g.cache_entries(),
            g.cache_bytes(),
            g.pending(),
            g.requests_served(),
            g.generations_run(),
            g.cache_hit_ratio().to_bits(),
        ];
        drop(g);
        if let Some(before) = last {
            // One signal for all that changed, as the specification intends.
            let names = [
                "CacheEntries",
                "CacheBytes",
                "Pending",
                "RequestsServed",
                "GenerationsRun",
            ];
            let mut changed: HashMap<&str, zbus::Variant<'_>> = names
                .iter()
                .enumerate()
                .filter(|(i, _)| before[*i] != now[*i])
                .map(|(i, n)| (*n, zbus::Variant::from(now[i])))
                .collect();
            if before[5] != now[5] {
                changed.insert("CacheHitRatio", zbus::Variant::from(f64::from_bits(now[5])));
            }
            if !changed.is_empty() {
                let _ = zbus::fdo::Properties::properties_changed(
                    iface.signal_emitter(),
                    zbus::names::InterfaceName::from_static_str_unchecked(BUS_NAME),
                    changed,
                    std::borrow::Cow::Borrowed(&[]),
                )
                .await;
            }
        }
        last = Some(now);
    }
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
