//! Embeddings and retrievals of many texts on two runtimes, for the integer kernels' fidelity
//! gate (`make fidelity`, `models/pipeline/fidelity.py`):
//! `cargo run --release --example fidelity -- BUNDLE TEXTS OUT [A] [B]` reads one text per line of
//! TEXTS and writes OUT, one JSON object per text: for each runtime (default `integer` and
//! `int8`) the embedding, the retrieved experts and their weights, and the scope decision.
use std::io::{BufRead, Write};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [bundle, texts, out, rest @ ..] = &args[..] else {
        return Err("usage: fidelity BUNDLE TEXTS OUT [RUNTIME_A] [RUNTIME_B]".into());
    };
    let pick = |i: usize, d: &str| {
        rest.get(i)
            .map_or(d, String::as_str)
            .parse::<sglora::Runtime>()
    };
    let runtimes = [pick(0, "integer")?, pick(1, "int8")?];
    let gens = runtimes
        .iter()
        .map(|&r| sglora::Generator::load_with(bundle, r))
        .collect::<Result<Vec<_>, _>>()?;
    let opts = sglora::GenerateOptions {
        allow_ood: true,
        ..Default::default()
    };
    let mut w = std::io::BufWriter::new(std::fs::File::create(out)?);
    for line in std::io::BufReader::new(std::fs::File::open(texts)?).lines() {
        let text = line?;
        let mut row = serde_json::Map::new();
        for (r, g) in runtimes.iter().zip(&gens) {
            let e = g.encoder().embed(&text)?;
            let x = g.explain_text(&text, &opts)?;
            let experts: Vec<_> = x.experts.iter().map(|c| c.index).collect();
            let weights: Vec<_> = x.experts.iter().map(|c| c.weight).collect();
            row.insert(
                r.name().into(),
                serde_json::json!({
                    "embedding": e.vector,
                    "experts": experts,
                    "weights": weights,
                    "out_of_distribution": x.out_of_distribution,
                }),
            );
        }
        serde_json::to_writer(&mut w, &row)?;
        writeln!(w)?;
    }
    Ok(())
}
