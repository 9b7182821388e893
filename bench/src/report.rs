//! Aggregates the sweep's runs into rows per strategy and RTT, checks losslessness, fits
//! the analytic model, and writes e2e.json, e2e.md, speedup.svg and bytes.svg.

use std::collections::BTreeMap;
use std::path::Path;

use plotters::prelude::*;

use crate::e2e::Run;
use crate::model::{self, Inputs};

/// Where and how the sweep ran.
#[derive(Debug, Clone, serde::Serialize)]
#[allow(missing_docs)]
pub struct Meta {
    pub link: String,
    pub netem_unavailable: Option<String>,
    pub rate_mbit: f64,
    pub jitter_ms: f64,
    pub draft_model: String,
    pub target_model: String,
    pub prompts: String,
    pub num_prompts: usize,
    pub max_tokens: u32,
    pub gamma: u32,
    pub cores: String,
    pub early_exit_layer: Option<usize>,
    pub machine: String,
    pub command: String,
    pub wall_s: f64,
}

/// One strategy at one RTT, over all prompts.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    /// Strategy.
    pub strategy: String,
    /// Nominal link RTT, ms.
    pub rtt_ms: f64,
    /// Generated tokens (all prompts).
    pub tokens: usize,
    /// Decoding rate: tokens after the first / seconds after the first token (the prompt's
    /// prefill is in `ttft_s`; this is what the analytic model describes).
    pub tokens_per_s: f64,
    /// Mean time per generated token after the first, ms.
    pub ms_per_token: f64,
    /// Mean time to first token (prefill + one round), s.
    pub ttft_s: f64,
    /// Decoding rate over the first 16 tokens (tokens 2–16 / their seconds), over the runs
    /// that reached 16 tokens: what a warm start changes most.
    pub first16_tokens_per_s: f64,
    /// Total tokens / total seconds, prompt to last token.
    pub end_to_end_tokens_per_s: f64,
    /// tokens_per_s / cloud-ar's at the same RTT.
    pub speedup: f64,
    /// Verify rounds.
    pub rounds: u32,
    /// Mean accepted drafts per round.
    pub accepted_per_round: f64,
    /// Mean committed tokens per round.
    pub tokens_per_round: f64,
    /// Rounds by draft length γ (index = γ).
    pub gamma_counts: Vec<u32>,
    /// Uplink bytes per generated token.
    pub up_bytes_per_token: f64,
    /// Downlink bytes per generated token.
    pub down_bytes_per_token: f64,
    /// Up + down.
    pub bytes_per_token: f64,
    /// Mean draft step measured by the host, ms (0 without a device drafter).
    pub draft_ms: f64,
    /// The link RTT the host measured (round minus verifier time), ms.
    pub measured_rtt_ms: f64,
    /// tokens_per_s / the analytic bound at this RTT (tandem strategies).
    pub achieved_over_bound: Option<f64>,
    /// tokens_per_s / the one-block-in-flight bound at this RTT (tandem strategies).
    pub achieved_over_chain_bound: Option<f64>,
}

/// The analytic model at one RTT.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Point {
    /// Nominal link RTT, ms.
    pub rtt_ms: f64,
    /// Measured inputs.
    pub inputs: Inputs,
    /// Pipelined bound with the measured verifier (block cost grows with its length).
    pub bound: model::Bound,
    /// The best rate with one block in flight and drafts ahead lost on a cut block
    /// (tandem's pipeline), same inputs.
    pub chain_bound: model::ChainBound,
    /// The model's cloud-ar rate.
    pub cloud_ar_tokens_per_s: f64,
    /// Projection, not a measurement: the same draft side and RTT with a verifier whose
    /// block cost is flat in block length (GPU-like).
    pub projection_flat_verify: Projection,
}

/// Rates the model projects for a verifier with flat block cost.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Projection {
    /// Pipelined tandem bound.
    pub tandem_tokens_per_s: f64,
    /// Its draft length.
    pub tandem_gamma: u32,
    /// Over the model's cloud-ar.
    pub tandem_speedup: f64,
    /// Synchronous γ = --gamma.
    pub sync_tokens_per_s: f64,
    /// Over the model's cloud-ar.
    pub sync_speedup: f64,
}

/// A generation whose text differs from cloud-ar's.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Mismatch {
    /// Strategy.
    pub strategy: String,
    /// Nominal RTT.
    pub rtt_ms: f64,
    /// Prompt index.
    pub prompt: usize,
    /// cloud-ar's text.
    pub expected: String,
    /// The strategy's.
    pub got: String,
}

#[derive(serde::Serialize)]
struct Report<'a> {
    meta: Meta,
    rows: &'a [Row],
    model: &'a [Point],
    mismatches: &'a [Mismatch],
    runs: &'a [Run],
}

/// A line about the machine: CPU model, cores, kernel.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpu}, {cores} cores, Linux {}", kernel.trim())
}

/// Longest draft the model considers (the host's default --max-draft).
const MAX_GAMMA: u32 = 16;

/// Writes the report; returns the number of texts that differ from cloud-ar's.
pub fn write(
    out: &Path,
    meta: Meta,
    strategies: &[String],
    runs: Vec<Run>,
) -> anyhow::Result<usize> {
    let mut rtts: Vec<f64> = runs.iter().map(|r| r.link_rtt_ms).collect();
    rtts.dedup();
    let mismatches = check_texts(&runs);
    let rows = rows(strategies, &rtts, &runs);
    let points = model_points(&rtts, &runs, meta.gamma, MAX_GAMMA);
    let rows: Vec<Row> = rows
        .into_iter()
        .map(|mut r| {
            if r.strategy.starts_with("tandem")
                && let Some(p) = points.iter().find(|p| p.rtt_ms == r.rtt_ms)
            {
                r.achieved_over_bound = Some(r.tokens_per_s / p.bound.tokens_per_s);
                r.achieved_over_chain_bound = Some(r.tokens_per_s / p.chain_bound.tokens_per_s);
            }
            r
        })
        .collect();
    let report = Report {
        meta: meta.clone(),
        rows: &rows,
        model: &points,
        mismatches: &mismatches,
        runs: &runs,
    };
    let json = out.join("e2e.json");
    std::fs::write(&json, serde_json::to_string_pretty(&report)? + "\n")?;
    let md = markdown(&meta, &rows, &points, mismatches.len());
    std::fs::write(out.join("e2e.md"), &md)?;
    println!("{md}");
    plot(
        &out.join("speedup.svg"),
        "Speedup over cloud-ar (tokens/s ratio)",
        "speedup",
        strategies,
        &rows,
        |r| r.speedup,
        Some(&points),
    )?;
    plot(
        &out.join("bytes.svg"),
        "Bytes per generated token (uplink + downlink)",
        "bytes / token",
        strategies,
        &rows,
        |r| r.bytes_per_token,
        None,
    )?;
    eprintln!(
        "wrote {}, e2e.md, speedup.svg and bytes.svg in {}",
        json.display(),
        out.display()
    );
    Ok(mismatches.len())
}

fn check_texts(runs: &[Run]) -> Vec<Mismatch> {
    // The reference of a prompt is cloud-ar's text at the first RTT: every other run
    // (other strategies, other RTTs) must equal it.
    let mut reference: BTreeMap<usize, &str> = BTreeMap::new();
    for r in runs.iter().filter(|r| r.sweep_strategy == "cloud-ar") {
        reference.entry(r.prompt).or_insert(&r.stats.text);
    }
    runs.iter()
        .filter_map(|r| {
            let want = reference.get(&r.prompt)?;
            (*want != r.stats.text).then(|| Mismatch {
                strategy: r.sweep_strategy.clone(),
                rtt_ms: r.link_rtt_ms,
                prompt: r.prompt,
                expected: want.to_string(),
                got: r.stats.text.clone(),
            })
        })
        .collect()
}

fn rows(strategies: &[String], rtts: &[f64], runs: &[Run]) -> Vec<Row> {
    let mut rows = Vec::new();
    for &rtt in rtts {
        let mut base = None;
        for s in strategies {
            let rs: Vec<&Run> = runs
                .iter()
                .filter(|r| r.link_rtt_ms == rtt && &r.sweep_strategy == s)
                .collect();
            if rs.is_empty() {
                continue;
            }
            let sum = |f: &dyn Fn(&Run) -> f64| rs.iter().map(|r| f(r)).sum::<f64>();
            let tokens = sum(&|r| r.stats.tokens as f64);
            let seconds = sum(&|r| r.stats.seconds);
            let rounds = sum(&|r| r.stats.rounds as f64);
            let accepted = sum(&|r| r.stats.accepted as f64);
            let decode_tokens = sum(&|r| r.stats.tokens.saturating_sub(1) as f64);
            let decode_s = sum(&|r| (r.stats.seconds - r.stats.ttft_s).max(0.0));
            let up = sum(&|r| r.stats.up_bytes_per_token * r.stats.tokens as f64);
            let down = sum(&|r| r.stats.down_bytes_per_token * r.stats.tokens as f64);
            let mut gamma_counts: Vec<u32> = Vec::new();
            for r in &rs {
                if gamma_counts.len() < r.stats.gamma_counts.len() {
                    gamma_counts.resize(r.stats.gamma_counts.len(), 0);
                }
                for (i, c) in r.stats.gamma_counts.iter().enumerate() {
                    gamma_counts[i] += c;
                }
            }
            let weighted = |f: &dyn Fn(&Run) -> f64| {
                let w = sum(&|r| r.stats.rounds as f64);
                if w > 0.0 {
                    sum(&|r| f(r) * r.stats.rounds as f64) / w
                } else {
                    0.0
                }
            };
            let tps = decode_tokens / decode_s.max(1e-9);
            let reached16: Vec<&&Run> = rs.iter().filter(|r| r.stats.t16_s > 0.0).collect();
            let first16_s: f64 = reached16
                .iter()
                .map(|r| (r.stats.t16_s - r.stats.ttft_s).max(0.0))
                .sum();
            let first16_tokens_per_s = if first16_s > 0.0 {
                15.0 * reached16.len() as f64 / first16_s
            } else {
                0.0
            };
            if s == "cloud-ar" {
                base = Some(tps);
            }
            rows.push(Row {
                strategy: s.clone(),
                rtt_ms: rtt,
                tokens: tokens as usize,
                tokens_per_s: tps,
                ms_per_token: 1000.0 * decode_s / decode_tokens.max(1.0),
                ttft_s: sum(&|r| r.stats.ttft_s) / rs.len() as f64,
                first16_tokens_per_s,
                end_to_end_tokens_per_s: tokens / seconds.max(1e-9),
                speedup: base.map_or(f64::NAN, |b| tps / b),
                rounds: rounds as u32,
                accepted_per_round: if rounds > 0.0 { accepted / rounds } else { 0.0 },
                tokens_per_round: if rounds > 0.0 { tokens / rounds } else { 0.0 },
                gamma_counts,
                up_bytes_per_token: up / tokens.max(1.0),
                down_bytes_per_token: down / tokens.max(1.0),
                bytes_per_token: (up + down) / tokens.max(1.0),
                draft_ms: weighted(&|r| r.stats.draft_ms),
                measured_rtt_ms: weighted(&|r| r.stats.rtt_ms),
                achieved_over_bound: None,
                achieved_over_chain_bound: None,
            });
        }
    }
    rows
}

/// Fits the analytic model's inputs at each RTT from the runs there.
fn model_points(rtts: &[f64], runs: &[Run], gamma: u32, max_gamma: u32) -> Vec<Point> {
    // α: from the fixed-γ runs (sync, else the fixed-γ ablation), pooled over all RTTs
    // (greedy drafts and verdicts do not depend on the link).
    let fixed = |name: &str| -> Option<(f64, f64)> {
        let rs: Vec<&Run> = runs
            .iter()
            .filter(|r| r.sweep_strategy == name && r.stats.rounds > 0)
            .collect();
        let rounds: f64 = rs.iter().map(|r| r.stats.rounds as f64).sum();
        (rounds > 0.0).then(|| {
            let acc: f64 = rs.iter().map(|r| r.stats.accepted as f64).sum();
            let drafted: f64 = rs.iter().map(|r| r.stats.drafted as f64).sum();
            (acc / rounds, drafted / rounds)
        })
    };
    let alpha = match fixed("sync").or_else(|| fixed("tandem-fixed-gamma")) {
        Some((acc, _)) => model::alpha_from_accepted(acc, gamma),
        None => {
            let (a, d) = runs.iter().fold((0.0, 0.0), |(a, d), r| {
                (a + r.stats.accepted as f64, d + r.stats.drafted as f64)
            });
            if d > 0.0 { a / d } else { 0.0 }
        }
    };
    // Draft step: every run that drafted on the device, weighted by its rounds.
    let (dw, dsum) =
        runs.iter()
            .filter(|r| r.stats.draft_ms > 0.0)
            .fold((0.0, 0.0), |(w, s), r| {
                let w_r = r.stats.rounds.max(1) as f64;
                (w + w_r, s + w_r * r.stats.draft_ms)
            });
    let draft_ms = if dw > 0.0 { dsum / dw } else { 0.0 };
    // Verifier time per block length, pooled over all RTTs.
    let pts: Vec<(f64, f64, f64)> = runs
        .iter()
        .flat_map(|r| r.stats.verify_by_gamma.iter())
        .map(|v| ((v.gamma + 1) as f64, v.mean_ms, v.rounds as f64))
        .collect();
    let (a, b) = model::fit_line(&pts);
    rtts.iter()
        .map(|&rtt| {
            // The link's RTT as the host measured it at this point (it includes the
            // loopback and host overheads that the nominal figure leaves out).
            let rs: Vec<&Run> = runs
                .iter()
                .filter(|r| r.link_rtt_ms == rtt && r.stats.rounds > 0)
                .collect();
            let w: f64 = rs.iter().map(|r| r.stats.rounds as f64).sum();
            let measured = if w > 0.0 {
                rs.iter()
                    .map(|r| r.stats.rtt_ms * r.stats.rounds as f64)
                    .sum::<f64>()
                    / w
            } else {
                rtt
            };
            let inputs = Inputs {
                alpha,
                draft_ms,
                verify_a_ms: a,
                verify_b_ms: b,
                rtt_ms: measured,
            };
            let ar = inputs.cloud_ar_rate();
            let flat = inputs.pipelined_bound(max_gamma, true);
            let sync_flat = inputs.sync_rate(gamma, true);
            Point {
                rtt_ms: rtt,
                inputs,
                bound: inputs.pipelined_bound(max_gamma, false),
                chain_bound: inputs.chain_bound(max_gamma),
                cloud_ar_tokens_per_s: ar,
                projection_flat_verify: Projection {
                    tandem_tokens_per_s: flat.tokens_per_s,
                    tandem_gamma: flat.gamma,
                    tandem_speedup: flat.tokens_per_s / ar,
                    sync_tokens_per_s: sync_flat,
                    sync_speedup: sync_flat / ar,
                },
            }
        })
        .collect()
}

fn markdown(meta: &Meta, rows: &[Row], points: &[Point], mismatches: usize) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Draft {} → target {}, {} prompts ({}), {} new tokens, greedy; link: {}, {} Mbit/s; \
         cores {}; {}. tok/s and ms/token are the decoding rate after the first token (the \
         prompt's prefill is in TTFT); speedup is tok/s over cloud-ar's at the same RTT.\n",
        meta.draft_model,
        meta.target_model,
        meta.num_prompts,
        meta.prompts,
        meta.max_tokens,
        meta.link,
        meta.rate_mbit,
        meta.cores,
        meta.machine
    );
    let _ = writeln!(
        s,
        "| RTT ms | strategy | tok/s | speedup | first 16 tok/s | ms/token | TTFT s | \
         end-to-end tok/s | tokens/round | γ (mode) | bytes/token up+down | achieved/bound | \
         achieved/chain bound |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let mode = r
            .gamma_counts
            .iter()
            .enumerate()
            .max_by_key(|(_, c)| **c)
            .filter(|(_, c)| **c > 0)
            .map_or("–".into(), |(g, _)| g.to_string());
        let _ = writeln!(
            s,
            "| {} | {} | {:.2} | {:.2}× | {:.2} | {:.0} | {:.2} | {:.2} | {} | {} | {:.1} + {:.1} | {} | {} |",
            r.rtt_ms,
            r.strategy,
            r.tokens_per_s,
            r.speedup,
            r.first16_tokens_per_s,
            r.ms_per_token,
            r.ttft_s,
            r.end_to_end_tokens_per_s,
            if r.rounds > 0 {
                format!("{:.2}", r.tokens_per_round)
            } else {
                "–".into()
            },
            mode,
            r.up_bytes_per_token,
            r.down_bytes_per_token,
            r.achieved_over_bound
                .map_or("–".into(), |x| format!("{x:.2}")),
            r.achieved_over_chain_bound
                .map_or("–".into(), |x| format!("{x:.2}"))
        );
    }
    let _ = writeln!(
        s,
        "\nAnalytic model (DESIGN.md) from the measured inputs. The bound overlaps every \
         flight with drafting; the chain bound is the best plan of tandem's pipeline (one \
         block in flight, drafts ahead lost when a block is cut; the drafter policy's \
         two-state chain). The last two columns are a **projection** for a verifier whose \
         block cost is flat in block length (GPU-like), not a measurement.\n"
    );
    let _ = writeln!(
        s,
        "| RTT ms | measured RTT | α | draft ms | verify ms (a + b·n) | bound tok/s (γ) | \
         chain bound tok/s (γ_f, γ_w) | model cloud-ar | projected tandem (γ) | projected speedup |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|");
    for p in points {
        let i = &p.inputs;
        let _ = writeln!(
            s,
            "| {} | {:.1} | {:.3} | {:.1} | {:.1} + {:.1}·n | {:.2} ({}) | {:.2} ({}, {}) | {:.2} | \
             {:.2} ({}) | {:.2}× |",
            p.rtt_ms,
            i.rtt_ms,
            i.alpha,
            i.draft_ms,
            i.verify_a_ms,
            i.verify_b_ms,
            p.bound.tokens_per_s,
            p.bound.gamma,
            p.chain_bound.tokens_per_s,
            p.chain_bound.fresh,
            p.chain_bound.warm,
            p.cloud_ar_tokens_per_s,
            p.projection_flat_verify.tandem_tokens_per_s,
            p.projection_flat_verify.tandem_gamma,
            p.projection_flat_verify.tandem_speedup
        );
    }
    let _ = writeln!(
        s,
        "\nLosslessness: {} generation(s) differ from cloud-ar's text.",
        mismatches
    );
    s
}

const COLORS: [RGBColor; 8] = [
    RGBColor(0, 0, 0),
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(127, 127, 127),
];

fn plot(
    path: &Path,
    title: &str,
    y_desc: &str,
    strategies: &[String],
    rows: &[Row],
    y: impl Fn(&Row) -> f64,
    projection: Option<&[Point]>,
) -> anyhow::Result<()> {
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("drawing {}: {e}", path.display());
    let xmax = rows.iter().map(|r| r.rtt_ms).fold(1.0, f64::max);
    let mut ymax = rows
        .iter()
        .map(&y)
        .filter(|v| v.is_finite())
        .fold(1.0, f64::max);
    if let Some(p) = projection {
        ymax = p
            .iter()
            .map(|p| p.projection_flat_verify.tandem_speedup)
            .fold(ymax, f64::max);
    }
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(0f64..xmax * 1.02, 0f64..ymax * 1.1)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("link RTT, ms")
        .y_desc(y_desc)
        .draw()
        .map_err(|e| err(&e))?;
    for (i, s) in strategies.iter().enumerate() {
        let pts: Vec<(f64, f64)> = rows
            .iter()
            .filter(|r| &r.strategy == s)
            .map(|r| (r.rtt_ms, y(r)))
            .filter(|p| p.1.is_finite())
            .collect();
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(s.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(|e| err(&e))?;
    }
    if let Some(points) = projection {
        let color = RGBColor(214, 39, 40).mix(0.5);
        let pts: Vec<(f64, f64)> = points
            .iter()
            .map(|p| (p.rtt_ms, p.projection_flat_verify.tandem_speedup))
            .collect();
        chart
            .draw_series(DashedLineSeries::new(pts, 6, 4, color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label("tandem, PROJECTED with a flat-cost (GPU-like) verifier")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
