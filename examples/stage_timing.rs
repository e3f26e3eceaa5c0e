//! Per-stage timing of cache-miss generations written to disk (dev aid for `make bench`'s
//! section 2): `cargo run --release --example stage_timing [BUNDLE] [N]`.
use std::time::Instant;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().unwrap_or_else(|| "models/default".into());
    let n: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(200);
    let g = sglora::Generator::load(dir)?;
    let text = "Given the name of an animal, find the broader category it is a kind of.";
    let opts = sglora::GenerateOptions {
        allow_ood: true,
        ..Default::default()
    };
    let tmp = std::env::temp_dir().join(format!("sglora-stage-timing-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let names = [
        "tokenize", "encode", "retrieve", "prior", "cvae", "write", "total",
    ];
    let mut cols: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    for i in 0..n + 10 {
        let t = Instant::now();
        let r = g.generate_text(text, &opts)?;
        let tw = Instant::now();
        sglora::write_atomic(&tmp.join(i.to_string()), &g.adapter_files(&r)?, false)?;
        let write_ms = tw.elapsed().as_secs_f64() * 1e3;
        let total = t.elapsed().as_secs_f64() * 1e3;
        let tm = &r.explanation.timings;
        if i >= 10 {
            let vals = [
                tm.tokenize_ms,
                tm.encode_ms,
                tm.retrieve_ms,
                tm.prior_ms,
                tm.cvae_ms,
                write_ms,
                total,
            ];
            for (c, v) in cols.iter_mut().zip(vals) {
                c.push(v);
            }
        }
    }
    std::fs::remove_dir_all(&tmp)?;
    for (name, c) in names.iter().zip(cols.iter_mut()) {
        println!("{name:>9}: p50 {:.3} ms", median(c));
    }
    Ok(())
}
