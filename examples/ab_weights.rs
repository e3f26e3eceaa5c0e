//! Interleaved A/B of the encoder's in-memory weight precision (fp16 vs fp32) on the default
//! bundle: `cargo run --release --example ab_weights [REPS]`.
use std::time::Instant;

use sglora::bundle::Bundle;
use sglora::encoder::{Encoder, WeightPrecision};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let reps: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    let b = Bundle::open("models/default")?;
    let h = Encoder::load_with(&b, WeightPrecision::F16)?;
    let f = Encoder::load_with(&b, WeightPrecision::F32)?;
    let base = "Given the name of a common household tool, find the larger object or machine that it is usually a part of";
    for words in [5usize, 20, 100] {
        let text: String = base
            .split(' ')
            .cycle()
            .take(words)
            .collect::<Vec<_>>()
            .join(" ");
        let (mut th, mut tf) = (Vec::new(), Vec::new());
        for i in 0..reps + 3 {
            for (enc, v) in [(&h, &mut th), (&f, &mut tf)] {
                let t = Instant::now();
                std::hint::black_box(enc.embed(&text)?);
                if i >= 3 {
                    v.push(t.elapsed().as_secs_f64() * 1e3);
                }
            }
        }
        th.sort_by(f64::total_cmp);
        tf.sort_by(f64::total_cmp);
        let p50 = |v: &[f64]| v[v.len() / 2];
        println!(
            "{words:>3} words ({} tokens): fp16 {:.2} ms, fp32 {:.2} ms, fp16/fp32 {:.2}",
            h.tokenize(&text)?.len(),
            p50(&th),
            p50(&tf),
            p50(&th) / p50(&tf)
        );
    }
    Ok(())
}
