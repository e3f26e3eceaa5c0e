//! `sglora`: command-line front end of the sglora library.

use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use sglora::{Bundle, Explanation, GenerateOptions, Generator};

/// Turn a text description of a task into a PEFT LoRA adapter (SG-LoRA), offline.
#[derive(Parser)]
#[command(name = "sglora", version, about, long_about = None)]
struct Cli {
    /// Model bundle directory (default: $SGLORA_BUNDLE, the installed bundle, ./models/default).
    #[arg(long, global = true, value_name = "DIR")]
    bundle: Option<PathBuf>,
    /// How the networks run: auto (the default: integer), integer (int8 × int8 in int32, the same
    /// bits on every platform), int8 (int8 weights, f32 activations), fp16 or fp32 (tract).
    #[arg(long, global = true, value_name = "RUNTIME", default_value = "auto")]
    runtime: sglora::Runtime,
    /// State directory: where experts added with `sglora experts add` live, and for `daemon` its
    /// cache database and drop folder too (overrides its configuration and $STATE_DIRECTORY).
    /// Default: $SGLORA_STATE_DIR; for the installed bundle, the installed daemon's state_dir.
    #[arg(long, global = true, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct GenArgs {
    /// Task description; `-` reads it from standard input.
    description: String,
    /// Number of experts to mix (default: the bundle's).
    #[arg(long, value_name = "K")]
    top_k: Option<usize>,
    /// Softmax temperature over the retrieval scores (default: the bundle's).
    #[arg(long, value_name = "T")]
    temperature: Option<f64>,
    /// Generate even when the description is far from every expert (marked in provenance).
    #[arg(long)]
    allow_ood: bool,
    /// Out-of-distribution threshold on the best expert score (default: the bundle's).
    #[arg(long, value_name = "SIM")]
    min_similarity: Option<f64>,
    /// Refuse when the expected R@1 gain is below this many points, 0-100 (default: no minimum;
    /// --allow-ood does not lift it).
    #[arg(long, value_name = "POINTS")]
    min_expected_gain: Option<f64>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Generate an adapter directory for a task description.
    Generate {
        #[command(flatten)]
        args: GenArgs,
        /// Output directory (default: ./sglora-adapter-<hash>-s<seed>).
        #[arg(short, long, value_name = "DIR")]
        output: Option<PathBuf>,
        /// Seed of the latent noise (recorded in provenance.json).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Scale of the latent noise; 0 decodes the prior mean (default: the bundle's).
        #[arg(long, value_name = "S")]
        noise_scale: Option<f64>,
        /// Replace the output directory if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Show which experts a description retrieves and their weights; writes nothing.
    Explain {
        #[command(flatten)]
        args: GenArgs,
    },
    /// Embed texts with the bundle's encoder, with a LoRA adapter applied or not: one line of
    /// space-separated floats per text, in input order (or JSON).
    Embed {
        /// Texts to embed; `-` reads them from standard input, one per line.
        #[arg(required = true, value_name = "TEXT")]
        texts: Vec<String>,
        /// A PEFT LoRA adapter directory for this base model (one sglora generated, or one
        /// trained elsewhere); without it, the base model.
        #[arg(long, value_name = "DIR")]
        adapter: Option<PathBuf>,
        /// Print `{"dim": D, "embeddings": [[...], ...]}`.
        #[arg(long)]
        json: bool,
    },
    /// Write an adapter in a form another runtime loads: `onnx-merged` (the bundle's encoder with
    /// the adapter folded in, inputs `input_ids`/`attention_mask`, output `last_hidden_state`;
    /// fp32, or `--int8`), or `peft` (a copy of the PEFT directory).
    Export {
        /// A PEFT LoRA adapter directory for this base model.
        #[arg(required_unless_present = "base_slotted")]
        adapter: Option<PathBuf>,
        /// What to write.
        #[arg(long, value_enum, required_unless_present = "base_slotted")]
        format: Option<ExportFormat>,
        /// Write the bundle's encoder with empty LoRA slots, once per bundle, that onnxruntime
        /// fills with an `onnx-adapter` file (`RunOptions.add_active_adapter`).
        #[arg(long, conflicts_with_all = ["adapter", "format", "int8"])]
        base_slotted: bool,
        /// onnx-merged: int8 weights per output column, like the bundle's encoder (~4× smaller).
        #[arg(long)]
        int8: bool,
        /// Where to write it (a file for onnx-merged, a directory for peft); must not exist.
        #[arg(short, long, value_name = "PATH")]
        output: PathBuf,
    },
    /// List the expert repository (shipped and added experts); add or remove your own.
    #[command(args_conflicts_with_subcommands = true)]
    Experts {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        command: Option<ExpertsCommand>,
    },
    /// Run the service: D-Bus API, watched drop folder, adapter cache (see sglorad.toml.example).
    Daemon(DaemonArgs),
    /// Bundle maintenance.
    Bundle {
        #[command(subcommand)]
        command: BundleCommand,
    },
}

#[derive(Subcommand)]
enum ExpertsCommand {
    /// Add a PEFT LoRA adapter for this base model as an expert: projected onto the bundle's
    /// shared LoRA A (refused when that loses too much), keyed by its descriptions, kept in the
    /// state directory's overlay. A running daemon on that state directory uses it from its next
    /// request.
    Add {
        /// The adapter directory (adapter_config.json, adapter_model.safetensors).
        adapter: PathBuf,
        /// What the adapter's task is, in words a user would use; repeat for more wordings
        /// (each becomes a retrieval key).
        #[arg(long = "description", value_name = "TEXT", required = true)]
        descriptions: Vec<String>,
        /// Its name in the repository (default: added/<the directory's name>).
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
        /// Its relation family, for the expected gain (e.g. hypernym); default none.
        #[arg(long, value_name = "RELATION", default_value = "")]
        relation: String,
        /// Refuse when the projection onto the shared A loses more than this share of the
        /// adapter's weight change, 0-1.
        #[arg(long, value_name = "E", default_value_t = sglora::MAX_PROJECTION_ERROR)]
        max_projection_error: f64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove an added expert (shipped ones stay).
    Remove {
        /// Its name.
        name: String,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ExportFormat {
    /// A self-contained ONNX encoder with the adapter merged into its weights.
    OnnxMerged,
    /// onnxruntime's adapter file (.onnx_adapter) for the `--base-slotted` encoder.
    OnnxAdapter,
    /// The PEFT directory itself (adapter_config.json, adapter_model.safetensors), checked.
    Peft,
}

#[derive(clap::Args)]
struct DaemonArgs {
    /// Configuration file (default /etc/sglora/sglorad.toml; missing is fine unless given here).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Serve on the session bus.
    #[arg(long, conflicts_with_all = ["system", "bus_address"])]
    session: bool,
    /// Serve on the system bus (the default).
    #[arg(long, conflicts_with = "bus_address")]
    system: bool,
    /// Serve on the bus at this D-Bus address.
    #[arg(long, value_name = "ADDRESS")]
    bus_address: Option<String>,
    /// Cache directory (adapter files); overrides config and $CACHE_DIRECTORY.
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Drop-folder root (default STATE_DIR/dropbox).
    #[arg(long, value_name = "DIR")]
    dropbox_dir: Option<PathBuf>,
    /// Do not watch the drop folder.
    #[arg(long)]
    no_dropbox: bool,
    /// Cache size budget in bytes.
    #[arg(long, value_name = "BYTES")]
    cache_max_bytes: Option<u64>,
    /// Cosine threshold for serving a cached adapter to a similar description.
    #[arg(long, value_name = "SIM")]
    cache_threshold: Option<f64>,
    /// Generations running at once.
    #[arg(long, value_name = "N")]
    max_concurrent: Option<usize>,
    /// Requests allowed to wait; past it callers get Busy.
    #[arg(long, value_name = "N")]
    max_queue: Option<usize>,
}

/// `sglora daemon`; `state_dir` is the global `--state-dir` (cache database, drop folder, added
/// experts), which overrides the configuration and $STATE_DIRECTORY.
fn daemon(
    cli_bundle: Option<&Path>,
    state_dir: Option<PathBuf>,
    a: DaemonArgs,
) -> anyhow::Result<()> {
    use sglora_daemon::{BusKind, Config, Overrides, DEFAULT_CONFIG};
    let cfg = match &a.config {
        Some(p) => Config::load(p, true)?,
        None => Config::load(Path::new(DEFAULT_CONFIG), false)?,
    };
    let cfg = cfg.apply(Overrides {
        bus: match (a.session, a.system) {
            (true, _) => Some(BusKind::Session),
            (_, true) => Some(BusKind::System),
            _ => None,
        },
        bus_address: a.bus_address,
        state_dir,
        cache_dir: a.cache_dir,
        dropbox_dir: a.dropbox_dir,
        no_dropbox: a.no_dropbox,
        cache_max_bytes: a.cache_max_bytes,
        cache_threshold: a.cache_threshold,
        max_concurrent: a.max_concurrent,
        max_queue: a.max_queue,
    })?;
    let bundle = cli_bundle
        .map(Path::to_path_buf)
        .or_else(|| cfg.bundle.clone())
        .unwrap_or_else(|| bundle_dir(None));
    Ok(sglora_daemon::run_blocking(cfg, bundle)?)
}

#[derive(Subcommand)]
enum BundleCommand {
    /// Check the manifest and every file's size and SHA-256.
    Verify {
        /// Bundle directory (default: as for --bundle).
        dir: Option<PathBuf>,
    },
}

/// Where the installed bundle lives relative to the binary (`PREFIX/bin/sglora` →
/// `PREFIX/lib/sglora/models/default`).
fn installed_bundle() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let prefix = exe.parent()?.parent()?;
    let p = prefix.join("lib/sglora/models/default");
    p.join("manifest.json").exists().then_some(p)
}

fn bundle_dir(explicit: Option<&Path>) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    if let Some(p) = std::env::var_os("SGLORA_BUNDLE").filter(|v| !v.is_empty()) {
        return PathBuf::from(p);
    }
    installed_bundle().unwrap_or_else(|| PathBuf::from("models/default"))
}

fn read_description(arg: &str) -> anyhow::Result<String> {
    if arg != "-" {
        return Ok(arg.to_string());
    }
    let mut stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprintln!("reading the description from standard input; end with Ctrl-D");
    }
    let mut bytes = Vec::new();
    stdin
        .by_ref()
        .take(1 << 20)
        .read_to_end(&mut bytes)
        .context("reading standard input")?;
    String::from_utf8(bytes).map_err(|e| {
        sglora::Error::InvalidDescription(format!(
            "standard input is not valid UTF-8 (byte {} is not)",
            e.utf8_error().valid_up_to()
        ))
        .into()
    })
}

/// Most bytes `sglora embed -` reads from standard input.
const MAX_STDIN_TEXTS_BYTES: u64 = 256 << 20;
/// Texts embedded between two writes of the output.
const EMBED_CHUNK: usize = 256;

/// The texts of `sglora embed`: the arguments, or with `-` standard input's lines.
fn read_texts(args: Vec<String>) -> anyhow::Result<Vec<String>> {
    if args.iter().all(|a| a != "-") {
        return Ok(args);
    }
    if args.len() > 1 {
        bail!(sglora::Error::InvalidText(
            "`-` (read standard input) cannot be mixed with texts given as arguments".into()
        ));
    }
    let mut stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprintln!("reading texts from standard input, one per line; end with Ctrl-D");
    }
    let mut bytes = Vec::new();
    stdin
        .by_ref()
        .take(MAX_STDIN_TEXTS_BYTES + 1)
        .read_to_end(&mut bytes)
        .context("reading standard input")?;
    if bytes.len() as u64 > MAX_STDIN_TEXTS_BYTES {
        bail!(sglora::Error::InvalidText(format!(
            "standard input holds more than {MAX_STDIN_TEXTS_BYTES} bytes; split it into several calls"
        )));
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        sglora::Error::InvalidText(format!(
            "standard input is not valid UTF-8 (line {line}, byte {at} is not)"
        ))
    })?;
    let texts: Vec<String> = text
        .lines()
        .map(|l| l.strip_suffix('\r').unwrap_or(l).to_string())
        .collect();
    if texts.is_empty() {
        bail!(sglora::Error::InvalidText(
            "standard input holds no text".into()
        ));
    }
    Ok(texts)
}

/// The runtime `--runtime` chose (set once in `main`).
static RUNTIME: std::sync::OnceLock<sglora::Runtime> = std::sync::OnceLock::new();
/// The state directory whose expert overlay is loaded (set once in `main`).
static STATE_DIR: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();

/// The state directory: `--state-dir`, else `$SGLORA_STATE_DIR`, else — for the installed
/// bundle only — the installed daemon's `state_dir` (`/etc/sglora/sglorad.toml`, by default
/// `/var/lib/sglora`) if it exists.
fn state_dir(explicit: Option<&Path>, bundle: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("SGLORA_STATE_DIR").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let chosen = bundle_dir(bundle);
    if installed_bundle().as_deref() != Some(chosen.as_path()) {
        return None;
    }
    let cfg = sglora_daemon::Config::load(Path::new("/etc/sglora/sglorad.toml"), false).ok()?;
    // The service's state directory is private to it: a user who cannot read the overlay there
    // runs on the shipped experts (the daemon, which can, serves the added ones); root and the
    // service user use it, and a directory without an overlay yet is fine.
    match std::fs::File::open(cfg.state_dir.join(sglora::OVERLAY_FILE)) {
        Ok(_) => Some(cfg.state_dir),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && cfg.state_dir.is_dir() => {
            Some(cfg.state_dir)
        }
        Err(_) => None,
    }
}

/// Open a bundle and load its models on the chosen runtime, with the experts added in the
/// state directory (if there is one).
fn load(dir: impl AsRef<Path>) -> sglora::Result<Generator> {
    let g = Generator::load_with(dir, RUNTIME.get().copied().unwrap_or_default())?;
    let Some(Some(state)) = STATE_DIR.get() else {
        return Ok(g);
    };
    let g = g.with_overlay(state.join(sglora::OVERLAY_FILE))?;
    for (name, why) in g.skipped_experts() {
        eprintln!("warning: added expert {name:?} is left out: {why}");
    }
    Ok(g)
}

/// `sglora experts add` / `remove`.
fn experts_command(bundle: PathBuf, command: ExpertsCommand) -> anyhow::Result<()> {
    if !matches!(STATE_DIR.get(), Some(Some(_))) {
        bail!(sglora::Error::Expert(
            "no state directory for added experts: pass --state-dir DIR (the daemon's \
             state_dir, /var/lib/sglora on an installed system) or set SGLORA_STATE_DIR"
                .into()
        ));
    }
    let g = load(bundle)?;
    match command {
        ExpertsCommand::Add {
            adapter,
            descriptions,
            name,
            relation,
            max_projection_error,
            json,
        } => {
            let lora = g.encoder().load_adapter(&adapter)?;
            let name = name.unwrap_or_else(|| {
                let dir = adapter.canonicalize().unwrap_or_else(|_| adapter.clone());
                format!(
                    "added/{}",
                    dir.file_name()
                        .map_or_else(|| "adapter".into(), |n| n.to_string_lossy())
                )
            });
            let added = g.add_expert(
                &lora,
                &sglora::AddExpert {
                    name,
                    descriptions,
                    relation,
                    domain: String::new(),
                    max_projection_error,
                    source: adapter.display().to_string(),
                },
            )?;
            if json {
                println!("{}", serde_json::to_string_pretty(&added)?);
            } else {
                println!(
                    "added {:?}: rank {}, projection onto the shared A loses {:.2} % (worst \
                     module {}: {:.2} %); {} experts",
                    added.name,
                    added.rank,
                    100.0 * added.projection_error,
                    added.worst_module.0,
                    100.0 * added.worst_module.1,
                    added.experts
                );
            }
        }
        ExpertsCommand::Remove { name } => {
            g.remove_expert(&name)?;
            println!("removed {name:?}");
        }
    }
    Ok(())
}

/// `sglora embed`: every text is checked before anything is printed; the output is written a
/// chunk at a time, so memory stays bounded by the input.
fn embed(
    bundle: PathBuf,
    texts: Vec<String>,
    adapter: Option<PathBuf>,
    json: bool,
) -> anyhow::Result<()> {
    use std::io::Write;
    let texts = read_texts(texts)?;
    for (i, t) in texts.iter().enumerate() {
        sglora::check_text(i, t)?;
    }
    let g = load(bundle)?;
    let enc = g.encoder();
    let lora = adapter.map(|d| enc.load_adapter(&d)).transpose()?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if json {
        write!(out, "{{\"dim\": {}, \"embeddings\": [", enc.dim())?;
    }
    for (c, chunk) in texts.chunks(EMBED_CHUNK).enumerate() {
        for (j, e) in enc
            .embed_texts(chunk, lora.as_ref(), threads)?
            .iter()
            .enumerate()
        {
            let mut line = String::with_capacity(e.vector.len() * 12);
            for (k, x) in e.vector.iter().enumerate() {
                if k > 0 {
                    line.push_str(if json { ", " } else { " " });
                }
                line.push_str(&serde_json::to_string(x)?);
            }
            if json {
                let first = c == 0 && j == 0;
                write!(out, "{}[{line}]", if first { "" } else { ", " })?;
            } else {
                writeln!(out, "{line}")?;
            }
        }
    }
    if json {
        writeln!(out, "]}}")?;
    }
    out.flush()?;
    Ok(())
}

/// `sglora export`: the adapter is checked against the bundle first, then written atomically to a
/// path that must not exist (a temporary file beside it, fsynced, linked into place without
/// replacing anything).
fn export(
    bundle: PathBuf,
    adapter: Option<PathBuf>,
    format: Option<ExportFormat>,
    int8: bool,
    output: PathBuf,
) -> anyhow::Result<()> {
    let g = load(bundle)?;
    let (Some(adapter), Some(format)) = (adapter, format) else {
        // --base-slotted (clap requires the adapter and format otherwise).
        if output.symlink_metadata().is_ok() {
            bail!(sglora::Error::Output {
                path: output,
                what: "already exists; choose another path or remove it first".into(),
            });
        }
        let mut size = 0;
        sglora::write_file_atomic_with(&output, |f| {
            let mut w = std::io::BufWriter::new(f);
            size = sglora::write_onnx_slotted(g.bundle(), &mut w)?;
            std::io::Write::flush(&mut w).map_err(|e| sglora::Error::Output {
                path: output.clone(),
                what: format!("writing failed: {e}"),
            })
        })?;
        println!(
            "{}: ONNX encoder with empty LoRA slots on {} ({size} bytes; fill them with an \
             onnx-adapter file)",
            output.display(),
            g.bundle().manifest.lora.target_modules.join(", ")
        );
        return Ok(());
    };
    let lora = g.encoder().load_adapter(&adapter)?;
    let exists = |p: &Path| sglora::Error::Output {
        path: p.to_path_buf(),
        what: "already exists; choose another path or remove it first".into(),
    };
    if output.symlink_metadata().is_ok() {
        bail!(exists(&output));
    }
    if int8 && !matches!(format, ExportFormat::OnnxMerged) {
        bail!(sglora::Error::InvalidOption(
            "--int8 applies to onnx-merged only".into()
        ));
    }
    match format {
        ExportFormat::OnnxAdapter => {
            let bytes = sglora::onnx_adapter(g.bundle(), &lora)?;
            sglora::write_file_atomic(&output, &bytes)?;
            println!(
                "{}: onnxruntime adapter ({} parameters, {} bytes) for `sglora export --base-slotted`",
                output.display(),
                2 * lora.modules(),
                bytes.len()
            );
        }
        ExportFormat::Peft => {
            if int8 {
                bail!(sglora::Error::InvalidOption(
                    "--int8 applies to onnx-merged only".into()
                ));
            }
            let read = |name: &str| -> anyhow::Result<Vec<u8>> {
                std::fs::read(adapter.join(name)).with_context(|| format!("reading {name}"))
            };
            let weights = read(sglora::WEIGHTS_FILE)?;
            let weights_sha256 = sglora::sha256_hex(&weights);
            if weights_sha256 != lora.weights_sha256() {
                bail!(sglora::Error::Adapter {
                    path: adapter.clone(),
                    what: "changed while it was exported; try again".into(),
                });
            }
            let provenance = if adapter.join(sglora::PROVENANCE_FILE).is_file() {
                read(sglora::PROVENANCE_FILE)?
            } else {
                serde_json::to_vec_pretty(&serde_json::json!({
                    "exported_by": "sglora export", "source": adapter, "weights_sha256": weights_sha256,
                }))?
            };
            let files = sglora::AdapterFiles {
                weights,
                weights_sha256,
                config: read(sglora::CONFIG_FILE)?,
                provenance,
            };
            sglora::write_atomic(&output, &files, false)?;
            println!(
                "{}: PEFT adapter ({} modules, r = {})",
                output.display(),
                lora.modules(),
                lora.rank()
            );
        }
        ExportFormat::OnnxMerged => {
            let precision = if int8 {
                sglora::Precision::Int8
            } else {
                sglora::Precision::Fp32
            };
            let mut size = 0;
            sglora::write_file_atomic_with(&output, |f| {
                let mut w = std::io::BufWriter::new(f);
                size = sglora::write_onnx_merged(g.bundle(), &lora, precision, &mut w)?;
                std::io::Write::flush(&mut w).map_err(|e| sglora::Error::Output {
                    path: output.clone(),
                    what: format!("writing failed: {e}"),
                })
            })?;
            println!(
                "{}: ONNX encoder with the adapter merged ({}, {} bytes; inputs input_ids, \
                 attention_mask; output last_hidden_state: mean-pool over the mask, then L2)",
                output.display(),
                if int8 { "int8 weights" } else { "fp32" },
                size
            );
        }
    }
    Ok(())
}

fn options(a: &GenArgs, seed: u64, noise_scale: Option<f64>) -> GenerateOptions {
    GenerateOptions {
        seed,
        top_k: a.top_k,
        temperature: a.temperature,
        noise_scale,
        allow_ood: a.allow_ood,
        min_similarity: a.min_similarity,
        min_expected_gain: a.min_expected_gain,
    }
}

/// Text as it may be echoed to a terminal: control characters other than tab escaped (`\r`,
/// `\n`, `\u{1b}`), so an echoed description can neither overwrite the line nor send escape
/// sequences.
fn shown(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '\t' => c.to_string(),
            c if c.is_control() => c.escape_default().to_string(),
            c => c.to_string(),
        })
        .collect()
}

/// A signed number with one decimal and a true minus sign (`+5.1`, `−0.4`).
fn signed(x: f64) -> String {
    let s = format!("{x:+.1}");
    match s.strip_prefix('-') {
        Some(rest) => format!("\u{2212}{rest}"),
        None => s,
    }
}

fn print_explanation(ex: &Explanation) {
    println!("description: {}", shown(&ex.description));
    if let Some(r) = &ex.asked_relation {
        println!(
            "asked relation: {} (p {:.2}, the bundle's relation head)",
            shown(&r.relation),
            r.probability
        );
    }
    println!(
        "experts (K={}, tau={}):",
        ex.options.top_k, ex.options.temperature
    );
    for e in &ex.experts {
        println!(
            "  {:<34} similarity {:.3}  weight {:.3}",
            shown(&e.name),
            e.similarity,
            e.weight
        );
    }
    let g = &ex.expected_gain;
    println!(
        "expected R@1 gain: {} points ({:.0} % interval {} … {})",
        signed(g.estimate),
        g.level * 100.0,
        signed(g.low),
        signed(g.high)
    );
    if let Some(s) = ex.in_scope {
        println!(
            "in scope: score {:.2} (threshold {:.2})",
            s.score, s.min_score
        );
    }
    if ex.out_of_distribution {
        match ex.refused_by_scope() {
            Some(s) => println!(
                "warning: out of distribution (scope score {:.2} < {:.2}: not read as a task of \
                 this bundle's kind)",
                s.score, s.min_score
            ),
            _ => println!(
                "warning: out of distribution (best similarity {:.3} < {:.3})",
                ex.best_similarity, ex.options.min_similarity
            ),
        }
    }
    if let Some(min) = ex.options.min_expected_gain.filter(|m| g.estimate < *m) {
        println!(
            "warning: expected gain {} is below the minimum {min:.1}: generation would be refused",
            signed(g.estimate)
        );
    }
    if ex.truncated {
        println!(
            "note: the description was truncated to the encoder's {} tokens",
            ex.tokens
        );
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Daemon(a) => daemon(cli.bundle.as_deref(), cli.state_dir.clone(), a),
        Command::Bundle {
            command: BundleCommand::Verify { dir },
        } => {
            let dir = bundle_dir(dir.as_deref().or(cli.bundle.as_deref()));
            let b = Bundle::open_unverified(&dir)?;
            let problems = b.verify_files();
            for p in &problems {
                eprintln!("FAIL {}: {}", p.file, p.what);
            }
            if !problems.is_empty() {
                bail!(
                    "{} of {} files in {} failed verification",
                    problems.len(),
                    b.manifest.files.len(),
                    dir.display()
                );
            }
            // Also prove the models load.
            Generator::from_bundle(b.clone())?;
            println!(
                "ok: {} ({} files, {} experts, bundle sha256 {})",
                b.manifest.bundle_id,
                b.manifest.files.len(),
                b.manifest.experts.count,
                b.hash
            );
            Ok(())
        }
        Command::Embed {
            texts,
            adapter,
            json,
        } => embed(bundle_dir(cli.bundle.as_deref()), texts, adapter, json),
        Command::Export {
            adapter,
            format,
            int8,
            output,
            base_slotted: _,
        } => export(
            bundle_dir(cli.bundle.as_deref()),
            adapter,
            format,
            int8,
            output,
        ),
        Command::Experts {
            command: Some(command),
            ..
        } => experts_command(bundle_dir(cli.bundle.as_deref()), command),
        Command::Experts {
            json,
            command: None,
        } => {
            let g = load(bundle_dir(cli.bundle.as_deref()))?;
            let ex = g.experts();
            let bytes_each = ex.dim() * 4 * 2;
            if json {
                let list: Vec<_> = ex
                    .metas()
                    .iter()
                    .map(|m| serde_json::json!({"name": m.name, "description": m.description, "relation": m.relation, "domain": m.domain, "bytes": bytes_each, "origin": m.origin(), "added": m.added}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!(
                    "{} experts ({} shipped, {} added; {} parameters each, {} KiB of \
                     mean+variance each)",
                    ex.len(),
                    ex.shipped(),
                    ex.len() - ex.shipped(),
                    ex.dim(),
                    bytes_each / 1024
                );
                for m in ex.metas() {
                    let tag = if m.added.is_some() { " [added]" } else { "" };
                    println!("  {:<34} {}{tag}", m.name, m.description);
                }
            }
            Ok(())
        }
        Command::Explain { args } => {
            let g = load(bundle_dir(cli.bundle.as_deref()))?;
            let text = read_description(&args.description)?;
            let ex = g.explain_text(&text, &options(&args, 0, None))?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&ex)?);
            } else {
                print_explanation(&ex);
            }
            Ok(())
        }
        Command::Generate {
            args,
            output,
            seed,
            noise_scale,
            force,
        } => {
            let t0 = std::time::Instant::now();
            let g = load(bundle_dir(cli.bundle.as_deref()))?;
            let load_ms = t0.elapsed().as_secs_f64() * 1e3;
            let text = read_description(&args.description)?;
            let opts = options(&args, seed, noise_scale);
            let generation = g.generate_text(&text, &opts)?;
            let dest = output.unwrap_or_else(|| {
                let h = generation.description.sha256();
                PathBuf::from(format!("sglora-adapter-{}-s{seed}", &h[..12]))
            });
            let t1 = std::time::Instant::now();
            sglora::write_atomic(&dest, &g.adapter_files(&generation)?, force)?;
            let write_ms = t1.elapsed().as_secs_f64() * 1e3;
            let ex = &generation.explanation;
            if args.json {
                let out = serde_json::json!({"adapter_dir": dest, "explanation": ex, "timings_ms": ex.timings, "write_ms": write_ms, "load_ms": load_ms});
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                print_explanation(ex);
                let t = &ex.timings;
                println!("adapter: {}", shown(&dest.to_string_lossy()));
                println!(
                    "time (ms): tokenize {:.2}  encode {:.2}  retrieve {:.2}  prior {:.2}  cvae {:.2}  write {:.2}  | total {:.2} (model load {:.0})",
                    t.tokenize_ms, t.encode_ms, t.retrieve_ms, t.prior_ms, t.cvae_ms, write_ms,
                    t.tokenize_ms + t.encode_ms + t.retrieve_ms + t.prior_ms + t.cvae_ms + write_ms, load_ms
                );
            }
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _ = RUNTIME.set(cli.runtime);
    let _ = STATE_DIR.set(state_dir(cli.state_dir.as_deref(), cli.bundle.as_deref()));
    if !matches!(cli.command, Command::Daemon(_)) {
        // A CLI piped into `head` should end quietly, like other Unix tools, not panic on EPIPE.
        // (The daemon keeps SIGPIPE ignored: a vanished peer must not kill it.)
        // SAFETY: setting a signal disposition to SIG_DFL at start-up, before any threads exist.
        unsafe {
            let _ = nix::sys::signal::signal(
                nix::sys::signal::Signal::SIGPIPE,
                nix::sys::signal::SigHandler::SigDfl,
            );
        }
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            let core = e.downcast_ref::<sglora::Error>().or_else(|| {
                e.downcast_ref::<sglora_daemon::Error>()
                    .and_then(sglora_daemon::Error::generation)
            });
            ExitCode::from(match core {
                Some(
                    sglora::Error::InvalidDescription(_)
                    | sglora::Error::InvalidOption(_)
                    | sglora::Error::InvalidText(_),
                ) => 2,
                Some(
                    sglora::Error::OutOfDistribution { .. }
                    | sglora::Error::OutOfScope { .. }
                    | sglora::Error::LowExpectedGain { .. },
                ) => 3,
                Some(sglora::Error::Bundle { .. }) => 4,
                Some(sglora::Error::Output { .. }) => 5,
                Some(sglora::Error::Adapter { .. }) => 6,
                Some(sglora::Error::Expert(_)) => 7,
                Some(sglora::Error::Overlay { .. }) => 8,
                _ => 1,
            })
        }
    }
}
