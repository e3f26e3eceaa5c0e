//! Property-based fuzzing (proptest; cargo-fuzz needs a nightly toolchain CI does not have) of
//! everything that parses outside input: drop-folder requests, D-Bus options (and their
//! resolution against the bundle), the bundle manifest, and the safetensors reader of the expert
//! repository. Every target first replays the committed seed corpus in `tests/fuzz-corpus/`,
//! then random cases. The property everywhere: no panic, and an `Ok` result is well-formed.
//!
//! `cargo test` runs 64 cases per target; `make fuzz` runs `PROPTEST_CASES` (default there:
//! 4000) within a time bound. A failing case is saved under `tests/fuzz.proptest-regressions`
//! and replayed first from then on (commit it with the fix).

use sglora_testkit as common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;

use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence};
use serde_json::Value;
use sglora::Experts;
use sglora::{sha256_hex, Bundle, Manifest};
use sglora_daemon::parse_request;
use zbus::{OwnedVariant as OwnedValue, Variant as ZValue};

fn config() -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    Config {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fuzz.proptest-regressions"
        )))),
        ..Config::default()
    }
}

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = common::root().join("tests/fuzz-corpus").join(target);
    let mut v: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    assert!(!v.is_empty(), "empty corpus {target}");
    v
}

fn generator() -> &'static sglora::Generator {
    static G: OnceLock<sglora::Generator> = OnceLock::new();
    G.get_or_init(|| sglora::Generator::load(common::bundle_dir()).unwrap())
}

// ---- drop-folder requests ---------------------------------------------------------------------

fn check_request(ext: &str, bytes: &[u8]) {
    if let Ok((desc, o)) = parse_request(ext, bytes) {
        if ext == "txt" {
            assert_eq!(desc.as_bytes(), bytes);
        }
        // Whatever parsed must resolve or be refused, never panic.
        let _ = sglora::validate_description(&desc);
        let _ = generator().resolve(&o);
    }
}

/// JSON-ish requests: the known keys and some others, with values of every type.
fn json_request() -> impl Strategy<Value = Vec<u8>> {
    let key = prop_oneof![
        Just("description".to_string()),
        Just("seed".to_string()),
        Just("top_k".to_string()),
        Just("temperature".to_string()),
        Just("noise_scale".to_string()),
        Just("min_expected_gain".to_string()),
        Just("allow_ood".to_string()),
        "[a-z_]{1,12}",
    ];
    let value = prop_oneof![
        any::<i64>().prop_map(|x| x.to_string()),
        any::<u64>().prop_map(|x| x.to_string()),
        any::<f64>().prop_map(|x| format!("{x:e}")),
        Just("1e400".to_string()),
        Just("-0".to_string()),
        Just("18446744073709551616".to_string()),
        any::<bool>().prop_map(|x| x.to_string()),
        Just("null".to_string()),
        ".{0,40}".prop_map(|s| serde_json::to_string(&s).unwrap()),
        Just("[]".to_string()),
        Just("{}".to_string()),
    ];
    proptest::collection::vec((key, value), 0..7).prop_map(|kv| {
        let body: Vec<String> = kv
            .into_iter()
            .map(|(k, v)| format!("{}: {v}", serde_json::to_string(&k).unwrap()))
            .collect();
        format!("{{{}}}", body.join(", ")).into_bytes()
    })
}

#[test]
fn drop_requests_corpus() {
    for (name, bytes) in corpus("requests") {
        let ext = name.rsplit('.').next().unwrap_or("txt");
        check_request(ext, &bytes);
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn drop_requests_random_bytes(ext in prop_oneof![Just("txt"), Just("json")],
                                  bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        check_request(ext, &bytes);
    }

    #[test]
    fn drop_requests_json_shapes(bytes in json_request()) {
        check_request("json", &bytes);
    }
}

proptest! {
    #![proptest_config(config())]

    /// Output names derived from any file name stay a plain name inside outbox/.
    #[test]
    fn output_names_cannot_escape(stem in "\\PC{0,150}") {
        let s = sglora_daemon::sanitize(&stem);
        prop_assert!(!s.is_empty() && s.len() <= 100);
        prop_assert!(!s.starts_with('.') && s != "..");
        prop_assert!(s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)));
    }
}

// ---- D-Bus options ----------------------------------------------------------------------------

fn option_value() -> impl Strategy<Value = OwnedValue> {
    prop_oneof![
        any::<u8>().prop_map(ZValue::U8),
        any::<bool>().prop_map(ZValue::Bool),
        any::<i16>().prop_map(ZValue::I16),
        any::<u16>().prop_map(ZValue::U16),
        any::<i32>().prop_map(ZValue::I32),
        any::<u32>().prop_map(ZValue::U32),
        any::<i64>().prop_map(ZValue::I64),
        any::<u64>().prop_map(ZValue::U64),
        any::<f64>().prop_map(ZValue::F64),
        Just(ZValue::F64(f64::NAN)),
        Just(ZValue::F64(f64::INFINITY)),
        ".{0,20}".prop_map(ZValue::from),
    ]
    .prop_map(|v| v.try_into().unwrap())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn dbus_options(kv in proptest::collection::vec((prop_oneof![
            Just("seed".to_string()), Just("top_k".to_string()), Just("temperature".to_string()),
            Just("noise_scale".to_string()), Just("min_similarity".to_string()),
            Just("min_expected_gain".to_string()),
            Just("allow_ood".to_string()), "[a-z_]{0,10}"], option_value()), 0..6)) {
        let map: HashMap<String, OwnedValue> = kv.into_iter().collect();
        if let Ok(o) = sglora_daemon::parse_options(&map) {
            if let Ok(r) = generator().resolve(&o) {
                prop_assert!(r.top_k >= 1);
                prop_assert!(r.temperature.is_finite() && r.temperature > 0.0);
                prop_assert!(r.noise_scale.is_finite() && r.noise_scale >= 0.0);
                prop_assert!((0.0..=1.0).contains(&r.min_similarity));
                prop_assert!(r.min_expected_gain.is_none_or(|g| (0.0..=100.0).contains(&g)));
            }
        }
    }
}

// ---- the manifest -----------------------------------------------------------------------------

fn manifest_json() -> &'static Value {
    static M: OnceLock<Value> = OnceLock::new();
    M.get_or_init(|| {
        serde_json::from_slice(&std::fs::read(common::bundle_dir().join("manifest.json")).unwrap())
            .unwrap()
    })
}

/// JSON pointers of every leaf (and container) of `v`.
fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
    out.push(at.clone());
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                pointers(
                    x,
                    format!("{at}/{}", k.replace('~', "~0").replace('/', "~1")),
                    out,
                )
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                pointers(x, format!("{at}/{i}"), out)
            }
        }
        _ => {}
    }
}

fn all_pointers() -> &'static Vec<String> {
    static P: OnceLock<Vec<String>> = OnceLock::new();
    P.get_or_init(|| {
        let mut v = Vec::new();
        pointers(manifest_json(), String::new(), &mut v);
        v
    })
}

fn replacement() -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        Just(None), // delete
        Just(Some(Value::Null)),
        any::<i64>().prop_map(|x| Some(x.into())),
        Just(Some(Value::from(u64::MAX))),
        Just(Some(Value::from(usize::MAX / 2 + 1))),
        Just(Some(Value::from(0))),
        Just(Some(Value::from(1))),
        any::<f64>().prop_map(|x| Some(serde_json::json!(x))),
        ".{0,12}".prop_map(|s| Some(Value::from(s))),
        Just(Some(Value::from("../../etc/passwd"))),
        Just(Some(serde_json::json!([]))),
        Just(Some(serde_json::json!({}))),
        Just(Some(serde_json::json!([0, 0]))),
    ]
}

fn mutate(ops: &[(usize, Option<Value>)]) -> Value {
    let mut m = manifest_json().clone();
    let ptrs = all_pointers();
    for (i, rep) in ops {
        let p = &ptrs[i % ptrs.len()];
        if p.is_empty() {
            continue;
        }
        let (parent, key) = p.rsplit_once('/').unwrap();
        let Some(parent) = m.pointer_mut(parent) else {
            continue;
        };
        match (parent, rep) {
            (Value::Object(o), None) => {
                o.remove(&key.replace("~1", "/").replace("~0", "~"));
            }
            (Value::Array(a), None) => {
                if let Ok(i) = key.parse::<usize>() {
                    if i < a.len() {
                        a.remove(i);
                    }
                }
            }
            (parent, Some(v)) => {
                if let Some(slot) = parent.pointer_mut(&format!("/{key}")) {
                    *slot = v.clone();
                }
            }
            _ => {}
        }
    }
    m
}

/// Parse and check a mutated manifest; when it is accepted, load the real expert repository
/// through it and serialise an adapter with its layout.
fn check_manifest(bytes: &[u8]) {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("manifest.json"), bytes).unwrap();
    let Ok(b) = Bundle::open_unverified(tmp.path()) else {
        return;
    };
    let real = Bundle {
        dir: common::bundle_dir(),
        manifest: b.manifest.clone(),
        hash: b.hash.clone(),
    };
    if let Ok((ex, _)) = Experts::load(&real) {
        let flat = vec![0f32; real.manifest.lora.flat_dim];
        let _ = sglora::weights_bytes(&real.manifest, &flat, &ex.lora_a);
    }
}

#[test]
fn manifest_corpus() {
    for (_, bytes) in corpus("manifest") {
        check_manifest(&bytes);
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn manifest_mutations(ops in proptest::collection::vec((any::<usize>(), replacement()), 1..4)) {
        check_manifest(&serde_json::to_vec(&mutate(&ops)).unwrap());
    }

    #[test]
    fn manifest_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        check_manifest(&bytes);
    }
}

// ---- the safetensors reader (expert repository) -----------------------------------------------

fn experts_bytes() -> &'static Vec<u8> {
    static B: OnceLock<Vec<u8>> = OnceLock::new();
    B.get_or_init(|| std::fs::read(common::bundle_dir().join("experts.safetensors")).unwrap())
}

/// Load the expert repository from `bytes` (pinned in the manifest, so the parser sees it).
fn check_experts(bytes: &[u8], dir: &Path) {
    let bundle = Bundle::open(common::bundle_dir()).unwrap();
    let mut manifest: Manifest = bundle.manifest.clone();
    let name = manifest.experts.file.clone();
    let meta = manifest.experts.meta.clone();
    std::fs::write(dir.join(&name), bytes).unwrap();
    std::fs::copy(bundle.path(&meta), dir.join(&meta)).unwrap();
    let e = manifest.files.get_mut(&name).unwrap();
    e.sha256 = sha256_hex(bytes);
    e.bytes = bytes.len() as u64;
    let b = Bundle {
        dir: dir.to_path_buf(),
        manifest,
        hash: bundle.hash,
    };
    if let Ok((ex, norm)) = Experts::load(&b) {
        assert_eq!(ex.len(), b.manifest.experts.count);
        assert!(norm.std().iter().all(|s| s.is_finite() && *s > 0.0));
    }
}

/// Header length of the real file (mutations concentrate there).
fn header_end() -> usize {
    let b = experts_bytes();
    8 + u64::from_le_bytes(b[..8].try_into().unwrap()) as usize
}

#[test]
fn safetensors_corpus() {
    let tmp = tempfile::tempdir().unwrap();
    for (_, bytes) in corpus("safetensors") {
        check_experts(&bytes, tmp.path());
    }
}

proptest! {
    #![proptest_config(Config { cases: config().cases.min(256), ..config() })]

    #[test]
    fn safetensors_header_mutations(flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
                                    cut in proptest::option::of(any::<usize>())) {
        let mut b = experts_bytes().clone();
        let h = header_end();
        for (pos, byte) in flips {
            let i = pos % (h + 16);
            b[i] = byte;
        }
        if let Some(c) = cut {
            b.truncate(c % (b.len() + 1));
        }
        let tmp = tempfile::tempdir().unwrap();
        check_experts(&b, tmp.path());
    }
}

// ---------------------------------------------------------------------------------------------
// Tokenizer: sglora's own WordPiece must give exactly the ids of Hugging Face `tokenizers` on the
// bundle's tokenizer.json (what the Python pipeline used), on any text.

fn tokenizers_pair() -> &'static (sglora::Tokenizer, tokenizers::Tokenizer, usize) {
    static T: OnceLock<(sglora::Tokenizer, tokenizers::Tokenizer, usize)> = OnceLock::new();
    T.get_or_init(|| {
        let b = Bundle::open(common::bundle_dir()).unwrap();
        let bytes = b.read(&b.manifest.encoder.tokenizer).unwrap();
        let max = b.manifest.encoder.max_tokens;
        let ours = sglora::Tokenizer::from_json(&bytes, max).unwrap();
        let mut hf = tokenizers::Tokenizer::from_bytes(&bytes).unwrap();
        hf.with_padding(None);
        hf.with_truncation(Some(tokenizers::TruncationParams {
            max_length: max,
            ..Default::default()
        }))
        .unwrap();
        (ours, hf, max)
    })
}

fn check_tokens(text: &str) {
    let (ours, hf, max) = tokenizers_pair();
    let want = hf.encode(text, true).unwrap().get_ids().to_vec();
    let got = ours.encode(text);
    assert_eq!(got, want, "token ids differ for {text:?}");
    assert!(got.len() <= *max);
}

#[test]
fn tokenizer_corpus() {
    for (_, bytes) in corpus("tokenizer") {
        let text = String::from_utf8(bytes).unwrap();
        check_tokens(&text);
    }
    for text in common::load::TEXTS {
        check_tokens(text);
    }
    let descs: Value = serde_json::from_slice(
        &std::fs::read(common::root().join("benches/descriptions.json")).unwrap(),
    )
    .unwrap();
    let mut n = 0;
    each_string(&descs, &mut |s| {
        check_tokens(s);
        n += 1;
    });
    assert!(n > 20, "only {n} descriptions checked");
}

fn each_string(v: &Value, f: &mut dyn FnMut(&str)) {
    match v {
        Value::String(s) => f(s),
        Value::Array(a) => a.iter().for_each(|x| each_string(x, f)),
        Value::Object(o) => o.values().for_each(|x| each_string(x, f)),
        _ => {}
    }
}

/// Text built from the pieces the tokenizer treats specially, in any order.
fn tricky_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        4 => "[a-zA-Z]{1,12}",
        2 => "[ \t\n\r\u{a0}\u{3000}\u{2028}]{1,3}",
        2 => "[!-/:-@\\[-`{-~¡-¿«»“”‘’—–…]",
        2 => "[à-ÿÀ-ÖØ-ÞĀ-ž]{1,4}",
        1 => "[\u{300}-\u{36f}]",
        1 => "[\u{4e00}-\u{4e40}\u{3040}-\u{30ff}\u{ac00}-\u{ac40}]{1,3}",
        1 => "[\u{0}-\u{1f}\u{7f}-\u{9f}\u{200b}-\u{200f}\u{feff}\u{fffd}\u{ad}]",
        1 => "[\u{1f300}-\u{1f6ff}\u{1f3fb}-\u{1f3ff}\u{200d}\u{fe0f}]",
        1 => prop_oneof![Just("[CLS]"), Just("[SEP]"), Just("[MASK]"), Just("[PAD]"), Just("[UNK]"), Just("[mask]")].prop_map(String::from),
        1 => "\\PC",
        1 => "[a-z]{90,110}",
    ];
    proptest::collection::vec(piece, 0..40).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn tokenizer_matches_hugging_face_on_tricky_text(text in tricky_text()) {
        check_tokens(&text);
    }

    #[test]
    fn tokenizer_matches_hugging_face_on_any_text(chars in proptest::collection::vec(any::<char>(), 0..200)) {
        check_tokens(&chars.into_iter().collect::<String>());
    }
}
