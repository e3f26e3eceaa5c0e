//! The real `sglora` binary on the real bundle and the real filesystem.

use sglora_testkit as common;

use common::cli::*;
use common::*;
use std::path::Path;
use std::process::{Command, Output};

const DESC: &str = "Given the name of an animal, find the broader category it is a kind of.";

fn generate(dir: &Path, seed: u64) -> Output {
    let o = sglora(&[
        "generate",
        DESC,
        "-o",
        dir.to_str().unwrap(),
        "--seed",
        &seed.to_string(),
        "--allow-ood",
    ]);
    assert!(o.status.success(), "generate failed: {}", stderr(&o));
    o
}

#[test]
fn generate_writes_a_valid_peft_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("a");
    let o = generate(&out, 1);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("adapter:") && text.contains("similarity"),
        "{text}"
    );
    println!("{text}");

    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundle_dir().join("manifest.json")).unwrap())
            .unwrap();
    let lora = &manifest["lora"];
    // safetensors: every tensor named and shaped as the manifest's layout says
    let bytes = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("adapter safetensors parses");
    let layout = lora["layout"].as_array().unwrap();
    assert_eq!(st.len(), layout.len() * 2);
    for m in layout {
        for (name, shape) in [("lora_A", "lora_A_shape"), ("lora_B", "lora_B_shape")] {
            let t = st
                .tensor(m[name].as_str().unwrap())
                .expect("tensor present");
            let want: Vec<usize> = m[shape]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .collect();
            assert_eq!(t.shape(), want.as_slice());
            assert_eq!(format!("{:?}", t.dtype()), lora["dtype"].as_str().unwrap());
        }
    }
    // B is not all zeros (an untrained LoRA would be)
    let b0 = st.tensor(layout[0]["lora_B"].as_str().unwrap()).unwrap();
    assert!(b0.data().iter().any(|x| *x != 0));

    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], lora["r"]);
    assert_eq!(cfg["lora_alpha"].as_f64(), lora["lora_alpha"].as_f64());
    assert_eq!(cfg["base_model_name_or_path"], manifest["base_model"]["id"]);
    let targets: Vec<&str> = cfg["target_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(targets.contains(&"query") && targets.contains(&"value"));

    let prov: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("provenance.json")).unwrap()).unwrap();
    for key in [
        "description",
        "embedding_sha256",
        "experts",
        "seed",
        "bundle",
        "sglora_version",
        "timings_ms",
        "weights_sha256",
    ] {
        assert!(!prov[key].is_null(), "provenance lacks {key}");
    }
    assert_eq!(prov["description"], DESC);
    assert_eq!(prov["seed"], 1);
    assert_eq!(prov["bundle"]["id"], manifest["bundle_id"]);
    let experts = prov["experts"].as_array().unwrap();
    assert_eq!(
        experts.len(),
        manifest["prior"]["top_k"]
            .as_u64()
            .unwrap()
            .min(manifest["experts"]["count"].as_u64().unwrap()) as usize
    );
    let wsum: f64 = experts.iter().map(|e| e["weight"].as_f64().unwrap()).sum();
    assert!((wsum - 1.0).abs() < 1e-6);
    assert_eq!(prov["weights_sha256"], sglora::sha256_hex(&bytes));
    // nothing else (no temp dirs) next to the output
    let names: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

#[test]
fn same_seed_is_byte_identical_and_another_seed_differs() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    generate(&a, 42);
    generate(&b, 42);
    generate(&c, 43);
    let read = |d: &Path| std::fs::read(d.join("adapter_model.safetensors")).unwrap();
    assert_eq!(
        read(&a),
        read(&b),
        "same seed must give byte-identical weights"
    );
    assert_ne!(read(&a), read(&c), "another seed must give other weights");
    let cfg = |d: &Path| std::fs::read(d.join("adapter_config.json")).unwrap();
    assert_eq!(cfg(&a), cfg(&b));
}

#[test]
fn json_output_and_stdin_description() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("j");
    let o = sglora_stdin(
        &[
            "generate",
            "-",
            "--json",
            "--allow-ood",
            "-o",
            out.to_str().unwrap(),
        ],
        DESC.as_bytes(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("--json prints JSON");
    assert_eq!(v["explanation"]["description"], DESC);
    assert!(v["timings_ms"]["encode_ms"].as_f64().unwrap() > 0.0);
    assert!(out.join("adapter_model.safetensors").exists());
}

#[test]
fn explain_writes_nothing_and_lists_experts() {
    let tmp = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_sglora"))
        .current_dir(tmp.path())
        .arg("--bundle")
        .arg(bundle_dir())
        .args(["explain", DESC, "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(!v["experts"].as_array().unwrap().is_empty());
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "explain must not write files"
    );
    let o = sglora(&["experts", "--json"]);
    assert!(o.status.success());
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundle_dir().join("manifest.json")).unwrap())
            .unwrap();
    assert_eq!(
        list.as_array().unwrap().len() as u64,
        manifest["experts"]["count"].as_u64().unwrap()
    );
}

#[test]
fn bad_descriptions_are_refused_with_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x");
    let o = out.to_str().unwrap();
    for (desc, needle) in [
        ("", "empty"),
        ("   \n\t ", "empty"),
        (&"word ".repeat(1000) as &str, "limit"),
        ("a\u{1}b", "control"),
    ] {
        let r = sglora(&["generate", desc, "-o", o]);
        assert_eq!(r.status.code(), Some(2), "{desc:?}: {}", stderr(&r));
        assert!(stderr(&r).contains(needle), "{desc:?}: {}", stderr(&r));
        assert!(!stderr(&r).contains("panicked"));
    }
    let r = sglora_stdin(&["generate", "-", "-o", o], b"find \xff\xfe antonyms");
    assert_ne!(r.status.code(), Some(0));
    assert!(stderr(&r).contains("UTF-8"), "{}", stderr(&r));
    assert!(!out.exists(), "nothing may be written for bad input");
}

#[test]
fn output_directory_rules() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("exists");
    generate(&out, 5);
    let before = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    let r = sglora(&[
        "generate",
        DESC,
        "-o",
        out.to_str().unwrap(),
        "--seed",
        "6",
        "--allow-ood",
    ]);
    assert_eq!(r.status.code(), Some(5), "{}", stderr(&r));
    assert!(stderr(&r).contains("already exists"));
    assert_eq!(
        std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
        before,
        "refused write must not touch the old adapter"
    );
    let r = sglora(&[
        "generate",
        DESC,
        "-o",
        out.to_str().unwrap(),
        "--seed",
        "6",
        "--allow-ood",
        "--force",
    ]);
    assert!(r.status.success(), "{}", stderr(&r));
    assert_ne!(
        std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
        before
    );
    // A parent that is a file cannot hold an adapter.
    let file = tmp.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let r = sglora(&[
        "generate",
        DESC,
        "-o",
        file.join("sub").to_str().unwrap(),
        "--allow-ood",
    ]);
    assert_eq!(r.status.code(), Some(5), "{}", stderr(&r));
}

#[test]
fn out_of_distribution_is_refused_unless_allowed() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ood");
    // A threshold this description does not reach makes the guard fire deterministically. (With
    // the bundle's relation head a confident relation adds up to gamma * ln R to the key
    // similarity, so a best score can pass 1: the premise is measured first.)
    const DESC: &str = "Given an animal, find its broader category.";
    let ex = sglora(&["explain", "--json", DESC]);
    let best = serde_json::from_slice::<serde_json::Value>(&ex.stdout).unwrap()["best_similarity"]
        .as_f64()
        .unwrap();
    assert!(best < 1.0, "premise: best score {best} below 1");
    let r = sglora(&[
        "generate",
        DESC,
        "-o",
        out.to_str().unwrap(),
        "--min-similarity",
        "1.0",
    ]);
    assert_eq!(r.status.code(), Some(3), "{}", stderr(&r));
    assert!(stderr(&r).contains("out of distribution"));
    assert!(!out.exists());
    let r = sglora(&[
        "generate",
        DESC,
        "-o",
        out.to_str().unwrap(),
        "--min-similarity",
        "1.0",
        "--allow-ood",
    ]);
    assert!(r.status.success(), "{}", stderr(&r));
    let prov: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("provenance.json")).unwrap()).unwrap();
    assert_eq!(prov["out_of_distribution"], true);
}

/// The scope guard: a task in a user's own words (an app framing, examples) is accepted even
/// though its best expert score is far below the templated descriptions'; another kind of task
/// is refused (exit 3) with a message that says why and what to do, unless `--allow-ood`, and the
/// score and threshold are in `explain` (text and JSON) and `provenance.json`. Both descriptions
/// are written here, in no set the pipeline saw.
#[test]
fn the_scope_guard_accepts_users_words_and_refuses_other_tasks() {
    let tmp = tempfile::tempdir().unwrap();
    let user =
        "Spelling game for kids: they type a word like 'hot' or 'happy' and the game should \
                show the word that means the opposite.";
    let r = sglora(&["explain", user, "--json"]);
    assert!(r.status.success(), "{}", stderr(&r));
    let ex: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    let s = &ex["in_scope"];
    assert!(
        s["score"].as_f64().unwrap() >= s["min_score"].as_f64().unwrap(),
        "{ex}"
    );
    assert_eq!(ex["out_of_distribution"], false, "{ex}");
    assert_eq!(ex["options"]["min_similarity"], 0.0);
    let out = tmp.path().join("user");
    let r = sglora(&["generate", user, "-o", out.to_str().unwrap()]);
    assert!(r.status.success(), "{}", stderr(&r));

    let other =
        "Our doorbell camera app should count how many people walk past the house each hour.";
    let out = tmp.path().join("other");
    let o = out.to_str().unwrap();
    let r = sglora(&["generate", other, "-o", o]);
    assert_eq!(r.status.code(), Some(3), "{}", stderr(&r));
    let msg = stderr(&r);
    assert!(
        msg.contains("does not read as a task")
            && msg.contains("scope score")
            && msg.contains("--allow-ood") | msg.contains("allow out-of-distribution"),
        "{msg}"
    );
    assert!(!out.exists());
    let text = sglora(&["explain", other]);
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(
        text.contains("in scope: score")
            && text.contains("warning: out of distribution (scope score"),
        "{text}"
    );
    let r = sglora(&["generate", other, "-o", o, "--allow-ood"]);
    assert!(r.status.success(), "{}", stderr(&r));
    let prov: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("provenance.json")).unwrap()).unwrap();
    assert_eq!(prov["out_of_distribution"], true);
    assert!(
        prov["in_scope"]["score"].as_f64().unwrap()
            < prov["in_scope"]["min_score"].as_f64().unwrap()
    );
}

/// `--min-expected-gain`: range-checked (exit 2), a minimum above the bundle's estimate refuses
/// (exit 3, `--allow-ood` does not lift it), one below it generates; the estimate is in
/// `explain` (text and JSON), `generate --json` and `provenance.json`.
#[test]
fn a_minimum_expected_gain_refuses_unless_met() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("gain");
    let o = out.to_str().unwrap();
    for bad in ["-1", "100.5", "nan", "inf"] {
        let flag = format!("--min-expected-gain={bad}");
        let r = sglora(&["generate", DESC, "-o", o, &flag]);
        assert_eq!(r.status.code(), Some(2), "{bad}: {}", stderr(&r));
        assert!(
            stderr(&r).contains("min_expected_gain must be between 0 and 100"),
            "{bad}: {}",
            stderr(&r)
        );
    }
    let r = sglora(&["generate", DESC, "-o", o, "--min-expected-gain", "lots"]);
    assert_eq!(r.status.code(), Some(2), "{}", stderr(&r));
    assert!(!out.exists());

    let r = sglora(&["explain", DESC, "--json"]);
    assert!(r.status.success(), "{}", stderr(&r));
    let ex: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    let g = &ex["expected_gain"];
    let (est, low, high) = (
        g["estimate"].as_f64().unwrap(),
        g["low"].as_f64().unwrap(),
        g["high"].as_f64().unwrap(),
    );
    assert!(low <= est && est <= high, "{g}");
    assert!(g["level"].as_f64().unwrap() > 0.0 && g["level"].as_f64().unwrap() < 1.0);
    assert_eq!(ex["options"]["min_expected_gain"], serde_json::Value::Null);
    let text = sglora(&["explain", DESC]);
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(
        text.contains("expected R@1 gain:") && text.contains("% interval"),
        "{text}"
    );

    let above = (est + 1.0).clamp(0.0, 100.0);
    assert!(est < above, "premise: the estimate {est} must be below 100");
    let above = above.to_string();
    for extra in [&[][..], &["--allow-ood"][..]] {
        let mut args = vec!["generate", DESC, "-o", o, "--min-expected-gain", &above];
        args.extend_from_slice(extra);
        let r = sglora(&args);
        assert_eq!(r.status.code(), Some(3), "{extra:?}: {}", stderr(&r));
        assert!(
            stderr(&r).contains("expected gain is too low")
                && stderr(&r).contains("min_expected_gain"),
            "{}",
            stderr(&r)
        );
        assert!(!out.exists(), "nothing may be written");
    }
    let r = sglora(&["explain", DESC, "--min-expected-gain", &above]);
    assert!(r.status.success(), "explain only warns: {}", stderr(&r));
    assert!(String::from_utf8_lossy(&r.stdout).contains("would be refused"));

    if est >= 0.0 {
        let below = (est - 0.5).clamp(0.0, 100.0).to_string();
        let r = sglora(&[
            "generate",
            DESC,
            "-o",
            o,
            "--allow-ood",
            "--json",
            "--min-expected-gain",
            &below,
        ]);
        assert!(r.status.success(), "{}", stderr(&r));
        let v: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
        assert_eq!(v["explanation"]["expected_gain"]["estimate"], est);
        let prov: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("provenance.json")).unwrap()).unwrap();
        assert_eq!(prov["expected_gain"]["estimate"], est);
        let recorded = prov["options"]["min_expected_gain"].as_f64().unwrap();
        assert!((recorded - below.parse::<f64>().unwrap()).abs() < 1e-12);
    }
}

#[test]
fn bundle_verify_passes_and_names_a_corrupted_file() {
    let r = sglora(&["bundle", "verify"]);
    assert!(r.status.success(), "{}", stderr(&r));
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("b");
    std::fs::create_dir(&copy).unwrap();
    for e in std::fs::read_dir(bundle_dir()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), copy.join(e.file_name())).unwrap();
    }
    // flip one byte in the experts file
    let f = copy.join("experts.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    let n = bytes.len() - 1;
    bytes[n] ^= 0xff;
    std::fs::write(&f, &bytes).unwrap();
    let r = Command::new(env!("CARGO_BIN_EXE_sglora"))
        .args(["bundle", "verify"])
        .arg(&copy)
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(1));
    assert!(
        stderr(&r).contains("experts.safetensors") && stderr(&r).contains("sha256"),
        "{}",
        stderr(&r)
    );
    // truncated encoder: generate refuses with the file's name
    let enc = copy.join("encoder.onnx");
    let len = std::fs::metadata(&enc).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&enc)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let r = sglora_with(&copy, &["generate", DESC]);
    assert_eq!(r.status.code(), Some(4), "{}", stderr(&r));
    assert!(
        stderr(&r).contains("encoder.onnx") || stderr(&r).contains("experts.safetensors"),
        "{}",
        stderr(&r)
    );
    // missing bundle directory
    let r = sglora_with(Path::new("/nonexistent/bundle"), &["experts"]);
    assert_eq!(r.status.code(), Some(4));
    assert!(stderr(&r).contains("manifest.json"));
}

/// `--force` replaces an adapter directory, never a file, a FIFO or a folder of other things;
/// what was there is left exactly as it was, and no temporary is left beside it.
#[test]
fn force_replaces_only_adapter_directories() {
    use std::os::unix::fs::FileTypeExt;
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("notes.txt");
    std::fs::write(&file, b"my notes").unwrap();
    let fifo = tmp.path().join("pipe");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let folder = tmp.path().join("photos");
    std::fs::create_dir(&folder).unwrap();
    std::fs::write(folder.join("cat.jpg"), b"jpeg").unwrap();
    for target in [&file, &fifo, &folder] {
        let r = sglora(&[
            "generate",
            DESC,
            "-o",
            target.to_str().unwrap(),
            "--allow-ood",
            "--force",
        ]);
        assert_eq!(r.status.code(), Some(5), "{target:?}: {}", stderr(&r));
        assert!(
            stderr(&r).contains("not an adapter directory"),
            "{}",
            stderr(&r)
        );
    }
    assert_eq!(std::fs::read(&file).unwrap(), b"my notes");
    assert!(std::fs::symlink_metadata(&fifo)
        .unwrap()
        .file_type()
        .is_fifo());
    assert_eq!(std::fs::read(folder.join("cat.jpg")).unwrap(), b"jpeg");
    let mut names: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["notes.txt", "photos", "pipe"]);
}

/// A description's control characters (other than tab) are escaped when the CLI echoes it: a
/// carriage return cannot overwrite what the terminal shows, a newline cannot fake a line.
#[test]
fn echoed_descriptions_cannot_drive_the_terminal() {
    let desc = "Given an adjective,\rfind its opposite.\nexperts: none\tOK";
    let r = sglora(&["explain", desc, "--allow-ood"]);
    assert!(r.status.success(), "{}", stderr(&r));
    let out = String::from_utf8(r.stdout).unwrap();
    assert!(
        !out.chars()
            .any(|c| c.is_control() && c != '\n' && c != '\t'),
        "{out:?}"
    );
    assert!(
        out.contains("description: Given an adjective,\\rfind its opposite.\\nexperts: none\tOK"),
        "{out}"
    );
}
