//! The emulated edge–cloud link: two network namespaces joined by a veth pair with
//! `tc netem` on both ends, or, where that is unavailable, the in-process shaper of
//! `tandem_client::shaper` on loopback.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};

/// How the link is emulated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LinkKind {
    /// netem if it works here, else the shaper.
    Auto,
    /// Network namespaces + veth + `tc netem` (needs root and the kernel's sch_netem).
    Netem,
    /// The in-process delay/rate proxy on 127.0.0.1.
    Shaper,
}

/// Link parameters of one sweep point.
#[derive(Debug, Clone, Copy)]
pub struct Params {
    /// Round trip time added, ms (half each way).
    pub rtt_ms: f64,
    /// Jitter of each one-way delay, ms (netem only).
    pub jitter_ms: f64,
    /// Bits per second each way; 0 = unlimited.
    pub rate_bps: u64,
}

/// Addresses in the namespaces the harness creates (a private /30 of its own).
const CLOUD_IP: &str = "10.231.77.1";
const EDGE_IP: &str = "10.231.77.2";
/// Port the verifier listens on inside its namespace.
pub const NETNS_PORT: u16 = 8750;

/// An emulated link that the harness owns.
pub enum Link {
    /// Verifier in `cloud`, host in `edge`.
    Netem {
        /// Namespace of the verifier.
        cloud: String,
        /// Namespace of the host.
        edge: String,
        cloud_dev: String,
        edge_dev: String,
    },
    /// Verifier on 127.0.0.1; each sweep point starts a proxy in front of it.
    Shaper {
        rt: tokio::runtime::Runtime,
        proxy: Option<tandem_client::shaper::Shaper>,
    },
}

impl Link {
    /// Sets up the link of `kind`; with `Auto`, returns the reason netem was not used.
    pub fn new(kind: LinkKind) -> anyhow::Result<(Link, Option<String>)> {
        match kind {
            LinkKind::Shaper => Ok((Link::shaper()?, None)),
            LinkKind::Netem => Ok((Link::netem()?, None)),
            LinkKind::Auto => match Link::netem() {
                Ok(l) => Ok((l, None)),
                Err(e) => Ok((Link::shaper()?, Some(format!("{e:#}")))),
            },
        }
    }

    fn shaper() -> anyhow::Result<Link> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        Ok(Link::Shaper { rt, proxy: None })
    }

    fn netem() -> anyhow::Result<Link> {
        let id = std::process::id();
        let link = Link::Netem {
            cloud: format!("tandem-cloud-{id}"),
            edge: format!("tandem-edge-{id}"),
            cloud_dev: format!("tdmc{id}"),
            edge_dev: format!("tdme{id}"),
        };
        let Link::Netem {
            cloud,
            edge,
            cloud_dev,
            edge_dev,
        } = &link
        else {
            unreachable!()
        };
        run("ip", &["netns", "add", cloud])?;
        // From here on, dropping `link` removes what was made.
        run("ip", &["netns", "add", edge])?;
        run(
            "ip",
            &[
                "link", "add", cloud_dev, "netns", cloud, "type", "veth", "peer", "name", edge_dev,
                "netns", edge,
            ],
        )?;
        for (ns, dev, ip) in [(cloud, cloud_dev, CLOUD_IP), (edge, edge_dev, EDGE_IP)] {
            run(
                "ip",
                &["-n", ns, "addr", "add", &format!("{ip}/30"), "dev", dev],
            )?;
            run("ip", &["-n", ns, "link", "set", "lo", "up"])?;
            run("ip", &["-n", ns, "link", "set", dev, "up"])?;
        }
        // Probe: the kernel must have netem.
        link.apply_netem(Params {
            rtt_ms: 1.0,
            jitter_ms: 0.0,
            rate_bps: 0,
        })
        .context("tc netem is not usable here")?;
        Ok(link)
    }

    /// Which emulation this is, for the report.
    pub fn describe(&self) -> &'static str {
        match self {
            Link::Netem { .. } => "netns + veth + tc netem",
            Link::Shaper { .. } => "in-process link shaper (tandem_client::shaper) on 127.0.0.1",
        }
    }

    /// The address the verifier should listen on.
    pub fn verifier_listen(&self) -> String {
        match self {
            Link::Netem { .. } => format!("{CLOUD_IP}:{NETNS_PORT}"),
            Link::Shaper { .. } => "127.0.0.1:0".into(),
        }
    }

    /// The command prefix that runs a program on the verifier's (`cloud`) or host's side.
    pub fn prefix(&self, cloud: bool) -> Vec<String> {
        match self {
            Link::Netem {
                cloud: c, edge: e, ..
            } => vec![
                "ip".into(),
                "netns".into(),
                "exec".into(),
                if cloud { c.clone() } else { e.clone() },
            ],
            Link::Shaper { .. } => Vec::new(),
        }
    }

    /// Sets netem's delay, jitter and rate on both ends of the veth pair.
    fn apply_netem(&self, p: Params) -> anyhow::Result<()> {
        match self {
            Link::Netem {
                cloud,
                edge,
                cloud_dev,
                edge_dev,
            } => {
                let one_way = format!("{}ms", p.rtt_ms / 2.0);
                for (ns, dev) in [(cloud, cloud_dev), (edge, edge_dev)] {
                    let mut a = vec![
                        "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "netem",
                        "limit", "100000", "delay", &one_way,
                    ];
                    let jitter = format!("{}ms", p.jitter_ms / 2.0);
                    if p.jitter_ms > 0.0 {
                        a.push(&jitter);
                    }
                    let rate = format!("{}bit", p.rate_bps);
                    if p.rate_bps > 0 {
                        a.extend(["rate", &rate]);
                    }
                    run("ip", &a)?;
                }
                Ok(())
            }
            Link::Shaper { .. } => bail!("internal: netem settings on a shaper link"),
        }
    }

    /// Applies `p` in front of the verifier at `verifier`; returns the address to dial.
    pub fn point(&mut self, p: Params, verifier: SocketAddr) -> anyhow::Result<SocketAddr> {
        match self {
            Link::Netem { .. } => {
                self.apply_netem(p)?;
                Ok(verifier)
            }
            Link::Shaper { rt, proxy } => {
                if p.jitter_ms > 0.0 {
                    bail!(
                        "the in-process shaper has no jitter; use --jitter-ms 0 or a machine \
                         with tc netem (--link netem)"
                    );
                }
                *proxy = None;
                let s = rt.block_on(tandem_client::shaper::start(
                    verifier,
                    tandem_client::shaper::Link {
                        delay: Duration::from_secs_f64(p.rtt_ms / 2000.0),
                        rate_bps: (p.rate_bps > 0).then_some(p.rate_bps),
                    },
                ))?;
                let addr = s.addr;
                *proxy = Some(s);
                Ok(addr)
            }
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        if let Link::Netem { cloud, edge, .. } = self {
            // Deleting the namespaces also deletes the veth pair.
            let _ = run("ip", &["netns", "del", cloud]);
            let _ = run("ip", &["netns", "del", edge]);
        }
    }
}

fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
