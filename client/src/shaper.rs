//! An in-process link shaper: a TCP proxy on 127.0.0.1 that delays every byte by a fixed
//! one-way latency and paces it at a rate, in both directions. For tests and benchmarks on
//! machines without network namespaces.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The link to emulate.
#[derive(Debug, Clone, Copy)]
pub struct Link {
    /// One-way delay (RTT / 2).
    pub delay: Duration,
    /// Bits per second in each direction; `None` for unlimited.
    pub rate_bps: Option<u64>,
}

/// A running proxy; stops when dropped.
pub struct Shaper {
    /// Address clients connect to instead of the upstream.
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Shaper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts a proxy to `upstream` with `link` applied in both directions.
pub async fn start(upstream: SocketAddr, link: Link) -> std::io::Result<Shaper> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                let up = tokio::spawn(pipe(cr, sw, link));
                let down = tokio::spawn(pipe(sr, cw, link));
                let _ = tokio::join!(up, down);
            });
        }
    });
    Ok(Shaper { addr, task })
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    link: Link,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        // When the link is next free to send (pacing), and each chunk's arrival time.
        let mut free_at = Instant::now();
        while let Some((sent, chunk)) = rx.recv().await {
            let start = free_at.max(sent);
            let serialise = link.rate_bps.map_or(Duration::ZERO, |r| {
                Duration::from_secs_f64(chunk.len() as f64 * 8.0 / r as f64)
            });
            free_at = start + serialise;
            tokio::time::sleep_until(free_at + link.delay).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}
