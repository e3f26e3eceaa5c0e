//! Interleaved A/B of two encoder runtimes on the default bundle, `encoder_weights` A vs B
//! (default integer vs int8): `cargo run --release --example ab_weights [REPS] [A] [B]`.
use std::time::Instant;

use sglora::Bundle;
use sglora::{Encoder, Runtime};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let reps: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    let pick = |i: usize, default: Runtime| {
        std::env::args()
            .nth(i)
            .map_or(Ok(default), |s| s.parse::<Runtime>())
    };
    let (pa, pb) = (pick(2, Runtime::Integer)?, pick(3, Runtime::Int8)?);
    let b = Bundle::open("models/default")?;
    let h = Encoder::load_with(&b, pa)?;
    let f = Encoder::load_with(&b, pb)?;
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
            "{words:>3} words ({} tokens): {a} {:.2} ms, {b} {:.2} ms, {a}/{b} {:.2}",
            h.tokenize(&text)?.len(),
            p50(&th),
            p50(&tf),
            p50(&th) / p50(&tf),
            a = pa.name(),
            b = pb.name(),
        );
    }
    Ok(())
}
