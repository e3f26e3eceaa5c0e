//! Quick timing of the encoder and of whole generations (dev aid; `make bench` is the real
//! benchmark): `cargo run --release --example encode_timing [BUNDLE]`.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "models/default".into());
    let g = sglora::Generator::load(dir)?;
    let text = "Given the name of an animal, find the broader category it is a kind of.";
    for _ in 0..5 {
        g.encoder().embed(text)?;
    }
    let mut v: Vec<f64> = (0..200)
        .map(|_| {
            let t = std::time::Instant::now();
            g.encoder()
                .embed(text)
                .map(|_| t.elapsed().as_secs_f64() * 1e3)
        })
        .collect::<Result<_, _>>()?;
    v.sort_by(f64::total_cmp);
    println!("embed: p50 {:.2} ms, p10 {:.2} ms", v[100], v[20]);
    let opts = sglora::GenerateOptions {
        allow_ood: true,
        ..Default::default()
    };
    let mut v: Vec<f64> = (0..100)
        .map(|_| {
            let t = std::time::Instant::now();
            g.generate(text, &opts)
                .map(|_| t.elapsed().as_secs_f64() * 1e3)
        })
        .collect::<Result<_, _>>()?;
    v.sort_by(f64::total_cmp);
    println!(
        "generate (no write): p50 {:.2} ms, p10 {:.2} ms",
        v[50], v[10]
    );
    Ok(())
}
