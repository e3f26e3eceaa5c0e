//! `sglora export`: the real binary writes the merged ONNX encoder, tract (a second runtime
//! beside onnxruntime, which `tests/embed_check.py` runs against PEFT) runs it on padded batches,
//! and its embeddings match `sglora embed --adapter`; the PEFT copy applies as the original;
//! bad input is refused with its exit code and nothing written.

use sglora_testkit as common;

use std::path::Path;

use common::cli::*;
use common::*;
use tract_onnx::prelude::*;

const TEXTS: [&str; 4] = [
    "hot",
    "a very small dog runs after the red ball in the park",
    "Given an adjective, find the word with the opposite meaning.",
    "cold",
];

fn generate(dir: &Path) {
    let o = sglora(&[
        "generate",
        "Given an adjective, find the word with the opposite meaning.",
        "-o",
        dir.to_str().unwrap(),
        "--seed",
        "4",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// Mean-pooled, L2-normalised embeddings of `TEXTS` from an ONNX encoder with inputs
/// `input_ids` and `attention_mask`, run by tract on one padded batch.
fn tract_embed(model: &Path, tok: &sglora::Tokenizer) -> Vec<Vec<f32>> {
    let ids: Vec<Vec<u32>> = TEXTS.iter().map(|t| tok.encode(t)).collect();
    let (b, s) = (ids.len(), ids.iter().map(Vec::len).max().unwrap());
    let mut input = vec![0i64; b * s];
    let mut mask = vec![0i64; b * s];
    for (i, row) in ids.iter().enumerate() {
        for (j, &id) in row.iter().enumerate() {
            input[i * s + j] = i64::from(id);
            mask[i * s + j] = 1;
        }
    }
    let plan = tract_onnx::onnx()
        .model_for_path(model)
        .unwrap()
        .with_input_fact(0, i64::fact([b, s]).into())
        .unwrap()
        .with_input_fact(1, i64::fact([b, s]).into())
        .unwrap()
        .into_optimized()
        .unwrap()
        .into_runnable()
        .unwrap();
    let out = plan
        .run(tvec!(
            Tensor::from_shape(&[b, s], &input).unwrap().into(),
            Tensor::from_shape(&[b, s], &mask).unwrap().into()
        ))
        .unwrap();
    let h = out[0].to_plain_array_view::<f32>().unwrap();
    assert_eq!(h.shape(), [b, s, 384]);
    (0..b)
        .map(|i| {
            let n = ids[i].len();
            let mut v = vec![0f64; 384];
            for j in 0..n {
                for (c, x) in v.iter_mut().enumerate() {
                    *x += f64::from(h[[i, j, c]]);
                }
            }
            let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
            v.iter().map(|x| (x / norm) as f32).collect()
        })
        .collect()
}

#[test]
fn merged_onnx_runs_in_tract_like_sglora_embed_and_peft_copies_apply_alike() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = tmp.path().join("adapter");
    generate(&adapter);
    let g = sglora::Generator::load(bundle_dir()).unwrap();
    let lora = g.encoder().load_adapter(&adapter).unwrap();
    let ours = g.encoder().embed_texts(&TEXTS, Some(&lora), 1).unwrap();
    let base = g.encoder().embed_texts(&TEXTS, None, 1).unwrap();
    let tok = sglora::Tokenizer::from_json(
        &std::fs::read(bundle_dir().join("tokenizer.json")).unwrap(),
        128,
    )
    .unwrap();
    for (flag, min) in [(None, 0.9999), (Some("--int8"), 0.995)] {
        let out = tmp
            .path()
            .join(format!("merged{}.onnx", flag.unwrap_or("")));
        let mut args = vec![
            "export",
            adapter.to_str().unwrap(),
            "--format",
            "onnx-merged",
            "-o",
            out.to_str().unwrap(),
        ];
        args.extend(flag);
        let o = sglora(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        let size = std::fs::metadata(&out).unwrap().len();
        let got = tract_embed(&out, &tok);
        for (i, (g, (o, b))) in got.iter().zip(ours.iter().zip(&base)).enumerate() {
            let c = cosine(g, &o.vector);
            assert!(c >= min, "{flag:?} text {i}: cosine {c} to sglora embed");
            // The adapter is in there: nearer the adapted vectors than the base ones.
            assert!(c > cosine(g, &b.vector), "{flag:?} text {i}: not adapted");
        }
        println!("{flag:?}: {size} bytes, tract agrees with sglora embed --adapter");
    }
    // The PEFT copy: the same files, applied alike.
    let copy = tmp.path().join("copy");
    let o = sglora(&[
        "export",
        adapter.to_str().unwrap(),
        "--format",
        "peft",
        "-o",
        copy.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    for f in [
        "adapter_model.safetensors",
        "adapter_config.json",
        "provenance.json",
    ] {
        assert_eq!(
            std::fs::read(copy.join(f)).unwrap(),
            std::fs::read(adapter.join(f)).unwrap(),
            "{f}"
        );
    }
}

#[test]
fn bad_export_input_is_refused_and_nothing_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = tmp.path().join("adapter");
    generate(&adapter);
    let taken = tmp.path().join("taken.onnx");
    std::fs::write(&taken, b"keep me").unwrap();
    let other = tmp.path().join("other");
    std::fs::create_dir(&other).unwrap();
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        std::fs::copy(adapter.join(f), other.join(f)).unwrap();
    }
    let cfg = other.join("adapter_config.json");
    let s = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        s.replace(
            "sentence-transformers/all-MiniLM-L6-v2",
            "bert-base-uncased",
        ),
    )
    .unwrap();
    let a = adapter.to_str().unwrap();
    let fresh = tmp.path().join("fresh.onnx");
    let f = fresh.to_str().unwrap();
    for (name, args, code, needle) in [
        (
            "existing output",
            vec![
                "export",
                a,
                "--format",
                "onnx-merged",
                "-o",
                taken.to_str().unwrap(),
            ],
            5,
            "already exists",
        ),
        (
            "existing output dir",
            vec![
                "export",
                a,
                "--format",
                "peft",
                "-o",
                other.to_str().unwrap(),
            ],
            5,
            "already exists",
        ),
        (
            "another base model",
            vec![
                "export",
                other.to_str().unwrap(),
                "--format",
                "onnx-merged",
                "-o",
                f,
            ],
            6,
            "bert-base-uncased",
        ),
        (
            "no adapter",
            vec!["export", "/nonexistent", "--format", "onnx-merged", "-o", f],
            6,
            "cannot be opened",
        ),
        (
            "--int8 for peft",
            vec!["export", a, "--format", "peft", "--int8", "-o", f],
            2,
            "onnx-merged only",
        ),
        (
            "unknown format",
            vec!["export", a, "--format", "gguf", "-o", f],
            2,
            "invalid value",
        ),
    ] {
        let o = sglora(&args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(code), "{name}: {err}");
        assert!(err.contains(needle), "{name}: {err}");
    }
    assert_eq!(
        std::fs::read(&taken).unwrap(),
        b"keep me",
        "an existing file is never replaced"
    );
    assert!(!fresh.exists(), "nothing written on a refusal");
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}
