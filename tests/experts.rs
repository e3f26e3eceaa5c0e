//! `sglora experts add` / `remove`: adapters joined to the repository through the overlay in a
//! state directory — the real binary, real adapter directories, the overlay file on disk — and
//! every adapter that does not fit refused with its reason and exit code, nothing written.

use sglora_testkit as common;

use std::path::Path;
use std::process::Output;

use common::cli::*;

const ANTONYM: &str = "Given an adjective, find the word with the opposite meaning.";
/// How a device maker might describe the task of the adapter they add.
const ADDED: &str =
    "Crossword helper: from a clue word, come up with another word that means the same thing";

fn in_state(state: &Path, args: &[&str]) -> Output {
    sglora(&[&["--state-dir", state.to_str().unwrap()], args].concat())
}

fn json(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", stderr(o));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn weights_sha(dir: &Path) -> String {
    let p: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("provenance.json")).unwrap()).unwrap();
    p["weights_sha256"].as_str().unwrap().to_string()
}

/// Write a PEFT LoRA directory by hand: rank `r`, scale `alpha / r`, on `modules` (paths inside
/// a layer, all 384 → 384) of all six layers; A and B from `a_of(layer, module, len)` and
/// `b_of(...)`.
fn write_lora(
    dir: &Path,
    r: usize,
    alpha: f64,
    modules: &[&str],
    a_of: &dyn Fn(usize, &str, usize) -> Vec<f32>,
    b_of: &dyn Fn(usize, &str, usize) -> Vec<f32>,
) {
    std::fs::create_dir_all(dir).unwrap();
    let targets: Vec<&str> = modules
        .iter()
        .map(|m| m.rsplit('.').next().unwrap())
        .collect();
    std::fs::write(
        dir.join("adapter_config.json"),
        serde_json::to_vec(&serde_json::json!({
            "peft_type": "LORA", "r": r, "lora_alpha": alpha, "bias": "none",
            "target_modules": targets,
            "base_model_name_or_path": "sentence-transformers/all-MiniLM-L6-v2"}))
        .unwrap(),
    )
    .unwrap();
    let mut bufs = Vec::new();
    for l in 0..6 {
        for m in modules {
            let p = format!("base_model.model.encoder.layer.{l}.{m}");
            bufs.push((
                format!("{p}.lora_A.weight"),
                vec![r, 384],
                sglora::f32s_to_le(&a_of(l, m, r * 384)),
            ));
            bufs.push((
                format!("{p}.lora_B.weight"),
                vec![384, r],
                sglora::f32s_to_le(&b_of(l, m, 384 * r)),
            ));
        }
    }
    write_weights(dir, &bufs);
}

/// Write `adapter_model.safetensors` in `dir` from (name, shape, little-endian F32 bytes).
fn write_weights(dir: &Path, tensors: &[(String, Vec<usize>, Vec<u8>)]) {
    let views: Vec<_> = tensors
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    std::fs::write(
        dir.join("adapter_model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
}

/// Deterministic values in [-0.05, 0.05) from a seed.
fn noise(seed: u64, len: usize) -> Vec<f32> {
    sglora::Rng::new(seed)
        .normals(len)
        .into_iter()
        .map(|x| (x * 0.02) as f32)
        .collect()
}

#[test]
fn an_added_adapter_is_retrieved_served_and_removed_again() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let overlay = state.join(sglora::OVERLAY_FILE);

    // The adapter to add: one sglora generated (the bundle's shared A, so it projects exactly),
    // its B doubled so it is no shipped expert's prior.
    let src = tmp.path().join("src");
    let o = sglora(&["generate", ANTONYM, "-o", src.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let w = std::fs::read(src.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&w).unwrap();
    let owned: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| {
            let v: Vec<f32> = sglora::f32s_from_le(t.data())
                .map(|x| if n.contains("lora_B") { 2.0 * x } else { x })
                .collect();
            (n, t.shape().to_vec(), sglora::f32s_to_le(&v))
        })
        .collect();
    write_weights(&src, &owned);

    let before = json(&in_state(&state, &["experts", "--json"]));
    let shipped = before.as_array().unwrap().len();
    assert!(before
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["origin"] == "bundle"));
    // Without the expert: what this description gets.
    let plain = tmp.path().join("plain");
    let o = in_state(
        &state,
        &[
            "generate",
            ADDED,
            "--allow-ood",
            "-o",
            plain.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));

    let added = json(&in_state(
        &state,
        &[
            "experts",
            "add",
            src.to_str().unwrap(),
            "--description",
            ADDED,
            "--description",
            "given a word, find a synonym",
            "--name",
            "mine/synonym",
            "--relation",
            "synonym",
            "--json",
        ],
    ));
    assert_eq!(added["name"], "mine/synonym");
    assert!(
        added["projection_error"].as_f64().unwrap() < 1e-3,
        "an adapter on the shared A must project exactly: {added}"
    );
    assert_eq!(added["experts"].as_u64().unwrap() as usize, shipped + 1);
    assert!(overlay.exists());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&overlay).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "the overlay is private: {mode:o}");

    // Listed with its origin, across processes (read back from the file).
    let list = json(&in_state(&state, &["experts", "--json"]));
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), shipped + 1);
    let mine = list.iter().find(|e| e["name"] == "mine/synonym").unwrap();
    assert_eq!(mine["origin"], "added");
    assert_eq!(mine["relation"], "synonym");
    assert_eq!(mine["description"], ADDED);
    assert_eq!(mine["added"]["rank"], 8);
    // Without the state directory the bundle's repository is unchanged.
    assert_eq!(
        json(&sglora(&["experts", "--json"]))
            .as_array()
            .unwrap()
            .len(),
        shipped
    );

    // Retrieval uses it at once: its own description and a paraphrase rank it first.
    for text in [ADDED, "Find a synonym for a word."] {
        let ex = json(&in_state(&state, &["explain", text, "--json"]));
        assert_eq!(ex["experts"][0]["name"], "mine/synonym", "{text}: {ex}");
    }
    // The served adapter mixes it in: other bytes than before, and the provenance names the
    // overlay it came from.
    let with = tmp.path().join("with");
    let o = in_state(
        &state,
        &[
            "generate",
            ADDED,
            "--allow-ood",
            "-o",
            with.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_ne!(weights_sha(&with), weights_sha(&plain));
    let prov: serde_json::Value =
        serde_json::from_slice(&std::fs::read(with.join("provenance.json")).unwrap()).unwrap();
    assert_eq!(
        prov["experts_overlay_sha256"].as_str().unwrap(),
        sglora::Overlay::read(&overlay).unwrap().sha256().unwrap()
    );
    let plain_prov: serde_json::Value =
        serde_json::from_slice(&std::fs::read(plain.join("provenance.json")).unwrap()).unwrap();
    assert!(plain_prov.get("experts_overlay_sha256").is_none());

    // A name in use, a shipped expert, an unknown name: refused (7), nothing changed.
    let bytes = std::fs::read(&overlay).unwrap();
    let shipped_name = before[0]["name"].as_str().unwrap();
    for args in [
        vec![
            "experts",
            "add",
            src.to_str().unwrap(),
            "--description",
            "x y z",
            "--name",
            "mine/synonym",
        ],
        vec![
            "experts",
            "add",
            src.to_str().unwrap(),
            "--description",
            "x y z",
            "--name",
            shipped_name,
        ],
        vec!["experts", "remove", shipped_name],
        vec!["experts", "remove", "nobody"],
    ] {
        let o = in_state(&state, &args);
        assert_eq!(o.status.code(), Some(7), "{args:?}: {}", stderr(&o));
        assert!(o.stdout.is_empty());
    }
    let e = stderr(&in_state(&state, &["experts", "remove", shipped_name]));
    assert!(e.contains("shipped with the bundle"), "{e}");
    assert_eq!(std::fs::read(&overlay).unwrap(), bytes);

    // Removed: the repository is the bundle's again, and so are the adapters it serves.
    let o = in_state(&state, &["experts", "remove", "mine/synonym"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!overlay.exists());
    assert_eq!(
        json(&in_state(&state, &["experts", "--json"]))
            .as_array()
            .unwrap()
            .len(),
        shipped
    );
    let again = tmp.path().join("again");
    let o = in_state(
        &state,
        &[
            "generate",
            ADDED,
            "--allow-ood",
            "-o",
            again.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(weights_sha(&again), weights_sha(&plain));
}

#[test]
fn adapters_that_do_not_fit_are_refused_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let overlay = state.join(sglora::OVERLAY_FILE);
    let qv = ["attention.self.query", "attention.self.value"];
    let seeded =
        |s: u64| move |l: usize, m: &str, n: usize| noise(s + 10 * l as u64 + m.len() as u64, n);

    // Its own random A: projected onto the bundle's A it keeps ~2 % of its ΔW.
    let foreign = tmp.path().join("foreign");
    write_lora(&foreign, 4, 8.0, &qv, &seeded(1), &seeded(2));
    let add = |dir: &Path, extra: &[&str]| {
        in_state(
            &state,
            &[
                &[
                    "experts",
                    "add",
                    dir.to_str().unwrap(),
                    "--description",
                    "given a word, find a rhyme",
                ],
                extra,
            ]
            .concat(),
        )
    };
    let o = add(&foreign, &[]);
    assert_eq!(o.status.code(), Some(7), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("share one frozen LoRA A")
            && e.contains("loses")
            && e.contains("max_projection_error"),
        "{e}"
    );
    assert!(!overlay.exists(), "a refused adapter wrote the overlay");

    // Other modules, or not all of the bundle's: refused as an adapter that does not fit (6).
    let qkv = tmp.path().join("qkv");
    write_lora(
        &qkv,
        4,
        8.0,
        &[
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
        ],
        &seeded(3),
        &seeded(4),
    );
    let q = tmp.path().join("q");
    write_lora(&q, 4, 8.0, &qv[..1], &seeded(5), &seeded(6));
    for (dir, says) in [(&qkv, "adapts modules"), (&q, "does not adapt")] {
        let o = add(dir, &["--max-projection-error", "1"]);
        assert_eq!(o.status.code(), Some(6), "{}", stderr(&o));
        assert!(stderr(&o).contains(says), "{}", stderr(&o));
    }
    // Nothing to add: every B zero.
    let zero = tmp.path().join("zero");
    write_lora(&zero, 4, 8.0, &qv, &seeded(7), &|_, _, n| vec![0.0; n]);
    let o = add(&zero, &["--max-projection-error", "1"]);
    assert_eq!(o.status.code(), Some(7), "{}", stderr(&o));
    assert!(stderr(&o).contains("changes nothing"), "{}", stderr(&o));
    // Bad options and descriptions: 2.
    for extra in [
        &["--max-projection-error", "NaN"][..],
        &["--max-projection-error=-0.5"],
        &["--max-projection-error", "2"],
        &["--description", ""],
    ] {
        let o = add(&foreign, extra);
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {}", stderr(&o));
    }
    assert!(!overlay.exists());

    // With the limit lifted it joins, and the error it was accepted with is reported.
    let o = add(&foreign, &["--max-projection-error", "1", "--json"]);
    let added = json(&o);
    let err = added["projection_error"].as_f64().unwrap();
    assert!(err > 0.9 && err < 1.0, "{added}");
    assert_eq!(added["name"], "added/foreign");

    // No state directory: refused, saying what to pass.
    let o = sglora(&[
        "experts",
        "add",
        foreign.to_str().unwrap(),
        "--description",
        "x",
    ]);
    assert_eq!(o.status.code(), Some(7), "{}", stderr(&o));
    assert!(stderr(&o).contains("--state-dir"), "{}", stderr(&o));

    // A damaged overlay is named, with what to do (8), and is not overwritten by an add.
    std::fs::write(&overlay, b"garbage").unwrap();
    let o = in_state(&state, &["experts"]);
    assert_eq!(o.status.code(), Some(8), "{}", stderr(&o));
    assert!(stderr(&o).contains("remove or restore"), "{}", stderr(&o));
    let o = add(
        &foreign,
        &["--max-projection-error", "1", "--name", "other"],
    );
    assert_eq!(o.status.code(), Some(8), "{}", stderr(&o));
    assert_eq!(std::fs::read(&overlay).unwrap(), b"garbage");
}
