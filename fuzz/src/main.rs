//! `tandem-fuzz`: runs the fuzz targets for a set time and prints what they found.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use tandem_fuzz::{Target, fuzz};

/// Fuzz tandem's decoders (frames, GGUF files, drafter events) for a set time each.
#[derive(Parser)]
struct Args {
    /// Targets to run (default: all).
    #[arg(long = "target", value_enum)]
    targets: Vec<Target>,
    /// Seconds per target.
    #[arg(long, default_value_t = 60.0)]
    seconds: f64,
    /// Seed (default: from the clock; printed, so a run can be repeated).
    #[arg(long)]
    seed: Option<u64>,
    /// Where crashing inputs are written.
    #[arg(long, default_value = "target/fuzz-crashes")]
    crashes: PathBuf,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Instead of fuzzing, write each target's seed inputs under DIR/TARGET/ (a corpus for
    /// `cargo fuzz`).
    #[arg(long, value_name = "DIR")]
    write_seeds: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let targets = if args.targets.is_empty() {
        Target::ALL.to_vec()
    } else {
        args.targets
    };
    if let Some(dir) = &args.write_seeds {
        for t in &targets {
            let d = dir.join(t.name());
            std::fs::create_dir_all(&d)?;
            for (i, s) in tandem_fuzz::seeds(*t)?.iter().enumerate() {
                std::fs::write(d.join(format!("seed-{i}")), s)?;
            }
        }
        return Ok(());
    }
    let mut json = Vec::new();
    let mut crashed = 0;
    for t in targets {
        let r = fuzz(
            t,
            Duration::from_secs_f64(args.seconds),
            seed,
            &args.crashes,
        )?;
        let reached: Vec<String> = r.reached.iter().map(|(k, n)| format!("{k}={n}")).collect();
        println!(
            "{:<7} seed {seed}: {} execs in {:.1} s ({:.0}/s), {} valid, {} crashes; reached {}",
            t.name(),
            r.execs,
            r.seconds,
            r.execs as f64 / r.seconds.max(1e-9),
            r.valid,
            r.crashes.len(),
            reached.join(" ")
        );
        for c in &r.crashes {
            println!("  crash input: {}", c.display());
        }
        crashed += r.crashes.len();
        json.push(format!(
            "{{\"target\":\"{}\",\"seed\":{seed},\"execs\":{},\"seconds\":{:.1},\"valid\":{},\"crashes\":{}}}",
            t.name(),
            r.execs,
            r.seconds,
            r.valid,
            r.crashes.len()
        ));
    }
    if let Some(p) = &args.json {
        std::fs::write(p, format!("[{}]\n", json.join(",")))?;
    }
    if crashed > 0 {
        anyhow::bail!(
            "{crashed} crashing inputs (saved under {})",
            args.crashes.display()
        );
    }
    Ok(())
}
