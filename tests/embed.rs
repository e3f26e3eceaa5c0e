//! `sglora embed`: the real binary, real adapter directories, its output read back and compared
//! with the library bit for bit; every bad input a clear error with its exit code and nothing on
//! standard output. (Agreement with sentence-transformers + PEFT is `tests/embed_check.py`.)

use sglora_testkit as common;

use std::path::Path;

use common::cli::*;
use common::*;

const ANTONYM: &str = "Given an adjective, find the word with the opposite meaning.";

fn floats(line: &str) -> Vec<f32> {
    line.split(' ').map(|x| x.parse().unwrap()).collect()
}

fn generate(dir: &Path, seed: u64) {
    let o = sglora(&[
        "generate",
        ANTONYM,
        "-o",
        dir.to_str().unwrap(),
        "--seed",
        &seed.to_string(),
        "--force",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn embed_prints_the_librarys_bits_in_input_order() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = tmp.path().join("a");
    generate(&adapter, 5);
    let g = sglora::Generator::load(bundle_dir()).unwrap();
    let lora = g.encoder().load_adapter(&adapter).unwrap();
    assert_eq!((lora.rank(), lora.modules(), lora.scale()), (8, 12, 2.0));
    let texts = ["hot", "a very small dog", "cold", "hot"];
    for adapted in [false, true] {
        let lora = adapted.then_some(&lora);
        let want: Vec<Vec<f32>> = texts
            .iter()
            .map(|t| {
                let ids = g.encoder().tokenize(t).unwrap();
                g.encoder().embed_ids_with(&ids, lora).unwrap().vector
            })
            .collect();
        let mut args = vec!["embed"];
        let a = adapter.to_str().unwrap();
        if adapted {
            args.extend(["--adapter", a]);
        }
        // Arguments, one line per text.
        let o = sglora(&[args.clone(), texts.to_vec()].concat());
        assert!(o.status.success(), "{}", stderr(&o));
        let text = String::from_utf8(o.stdout).unwrap();
        let got: Vec<Vec<f32>> = text.lines().map(floats).collect();
        assert_eq!(
            got, want,
            "adapter {adapted}: printed floats read back exactly"
        );
        // Standard input (CRLF too), JSON.
        let o = sglora_stdin(
            &[args.clone(), vec!["--json", "-"]].concat(),
            b"hot\r\na very small dog\ncold\nhot\n",
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(doc["dim"], 384);
        let got: Vec<Vec<f32>> = serde_json::from_value(doc["embeddings"].clone()).unwrap();
        assert_eq!(got, want, "adapter {adapted}: JSON from stdin");
    }
    // Many texts of many lengths: streamed in chunks, run in batches of several texts (their
    // boundaries fall at every length), on threads; every text still gets the bits it gets
    // alone, in order.
    let many: Vec<String> = (0..600)
        .map(|i| {
            let words = ["red", "ball", "runs", "after", "a", "small", "dog"];
            let tail: Vec<&str> = words.iter().cycle().take(i * 7 % 61).copied().collect();
            format!("text number {i} {}", tail.join(" "))
        })
        .collect();
    let o = sglora_stdin(
        &["embed", "--adapter", adapter.to_str().unwrap(), "-"],
        (many.join("\n") + "\n").as_bytes(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<Vec<f32>> = String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(floats)
        .collect();
    assert_eq!(lines.len(), 600);
    for i in 0..many.len() {
        let ids = g.encoder().tokenize(&many[i]).unwrap();
        assert_eq!(
            lines[i],
            g.encoder()
                .embed_ids_with(&ids, Some(&lora))
                .unwrap()
                .vector,
            "text {i}"
        );
    }
}

#[test]
fn a_zero_adapter_is_the_base_model_and_targets_beyond_query_value_apply() {
    // An adapter with every B zero adds exactly nothing; one on the feed-forward maps changes
    // the embeddings. Both are written here as PEFT would, by hand.
    let tmp = tempfile::tempdir().unwrap();
    let write = |dir: &Path, b: f32| {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(
            dir.join("adapter_config.json"),
            r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "bias": "none",
                "target_modules": ["dense"], "base_model_name_or_path": "sentence-transformers/all-MiniLM-L6-v2"}"#,
        )
        .unwrap();
        let mut bufs = Vec::new();
        for l in 0..6 {
            for (m, i, o) in [
                ("intermediate.dense", 384, 1536),
                ("output.dense", 1536, 384),
            ] {
                let p = format!("base_model.model.encoder.layer.{l}.{m}");
                let a: Vec<f32> = (0..2 * i).map(|k| ((k % 7) as f32 - 3.0) * 0.01).collect();
                bufs.push((format!("{p}.lora_A.weight"), vec![2, i], a));
                bufs.push((format!("{p}.lora_B.weight"), vec![o, 2], vec![b; o * 2]));
            }
        }
        let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = bufs
            .into_iter()
            .map(|(n, s, v)| (n, s, sglora::f32s_to_le(&v)))
            .collect();
        let views: Vec<_> = bytes
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
    };
    let zero = tmp.path().join("zero");
    let ffn = tmp.path().join("ffn");
    write(&zero, 0.0);
    write(&ffn, 0.01);
    let run = |extra: &[&str]| {
        let o = sglora(&[&["embed"], extra, &["a small dog", "hot"]].concat());
        assert!(o.status.success(), "{}", stderr(&o));
        o.stdout
    };
    let base = run(&[]);
    assert_eq!(run(&["--adapter", zero.to_str().unwrap()]), base);
    let changed = run(&["--adapter", ffn.to_str().unwrap()]);
    assert_ne!(changed, base);
    let (a, b) = (
        floats(String::from_utf8_lossy(&base).lines().next().unwrap()),
        floats(String::from_utf8_lossy(&changed).lines().next().unwrap()),
    );
    let cos = cosine(&a, &b);
    assert!(cos < 0.9999 && cos > 0.5, "cosine {cos}");
}

#[test]
fn bad_embed_input_is_refused_with_its_exit_code_and_no_output() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good");
    generate(&good, 1);
    let copy = |name: &str, edit: &dyn Fn(&Path)| {
        let d = tmp.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(good.join(f), d.join(f)).unwrap();
        }
        edit(&d);
        d.to_str().unwrap().to_string()
    };
    let config = |d: &Path, from: &str, to: &str| {
        let p = d.join("adapter_config.json");
        let s = std::fs::read_to_string(&p).unwrap();
        assert!(s.contains(from), "{s}");
        std::fs::write(&p, s.replacen(from, to, 1)).unwrap();
    };
    let truncated = copy("truncated", &|d| {
        let p = d.join("adapter_model.safetensors");
        let b = std::fs::read(&p).unwrap();
        std::fs::write(&p, &b[..b.len() / 2]).unwrap();
    });
    let other_base = copy("other-base", &|d| {
        config(
            d,
            "sentence-transformers/all-MiniLM-L6-v2",
            "bert-base-uncased",
        )
    });
    let other_type = copy("ia3", &|d| config(d, "\"LORA\"", "\"IA3\""));
    let no_config = copy("no-config", &|d| {
        std::fs::remove_file(d.join("adapter_config.json")).unwrap()
    });
    // An argument is at most 128 KiB (MAX_ARG_STRLEN): 100 KB there, 1 MB on stdin.
    let long_arg = "word ".repeat(20_000);
    let megabyte = format!("{}\n", "word ".repeat(200_000));
    let not_a_dir = good.join("adapter_config.json");
    // (case, arguments, standard input, exit code, part of the message)
    type Case<'a> = (&'a str, Vec<&'a str>, &'a [u8], u8, &'a str);
    let cases: Vec<Case> = vec![
        (
            "empty text",
            vec!["embed", "ok", ""],
            b"",
            2,
            "text 1 is empty",
        ),
        (
            "100 KB text",
            vec!["embed", &long_arg],
            b"",
            2,
            "limit is 65536",
        ),
        (
            "1 MB text",
            vec!["embed", "-"],
            megabyte.as_bytes(),
            2,
            "text 0 is 1000000 bytes",
        ),
        (
            "blank line",
            vec!["embed", "-"],
            b"one\n\nthree\n",
            2,
            "text 1 is empty",
        ),
        ("empty stdin", vec!["embed", "-"], b"", 2, "no text"),
        (
            "non-UTF-8 stdin",
            vec!["embed", "-"],
            b"ok\nbad \xff\n",
            2,
            "line 2",
        ),
        (
            "- and texts",
            vec!["embed", "-", "x"],
            b"",
            2,
            "cannot be mixed",
        ),
        (
            "missing adapter",
            vec!["embed", "--adapter", "/nonexistent", "x"],
            b"",
            6,
            "cannot be opened",
        ),
        (
            "a file, not a dir",
            vec!["embed", "--adapter", not_a_dir.to_str().unwrap(), "x"],
            b"",
            6,
            "is not a directory",
        ),
        (
            "truncated weights",
            vec!["embed", "--adapter", &truncated, "x"],
            b"",
            6,
            "not a valid safetensors file",
        ),
        (
            "another base model",
            vec!["embed", "--adapter", &other_base, "x"],
            b"",
            6,
            "bert-base-uncased",
        ),
        (
            "another PEFT method",
            vec!["embed", "--adapter", &other_type, "x"],
            b"",
            6,
            "IA3",
        ),
        (
            "no config",
            vec!["embed", "--adapter", &no_config, "x"],
            b"",
            6,
            "has no adapter_config.json",
        ),
    ];
    for (name, args, input, code, needle) in cases {
        let o = sglora_stdin(&args, input);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(i32::from(code)), "{name}: {err}");
        assert!(err.contains(needle), "{name}: {err}");
        assert!(o.stdout.is_empty(), "{name}: nothing printed");
    }
}
