//! Quick per-stage timing of repeated generations (dev aid; `make bench` is the real benchmark).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "models/default".into());
    let g = sglora::Generator::load(dir)?;
    let opts = sglora::GenerateOptions {
        allow_ood: true,
        ..Default::default()
    };
    for i in 0..6 {
        let t = std::time::Instant::now();
        let r = g.generate(
            "Given the name of an animal, find the broader category it is a kind of.",
            &opts,
        )?;
        let tm = &r.explanation.timings;
        println!(
            "{i}: total {:.1} ms (tokenize {:.2}, encode {:.1}, prior {:.1}, cvae {:.1})",
            t.elapsed().as_secs_f64() * 1e3,
            tm.tokenize_ms,
            tm.encode_ms,
            tm.prior_ms,
            tm.cvae_ms
        );
    }
    Ok(())
}
