//! tandem-verifier: the cloud side of tandem. It runs target models with tandem-models (or
//! on a GPU through tandem-gpu), verifies draft blocks sent over the session protocol of
//! tandem-core (one HTTP/2 stream per session), streams early-exit hints, and serves a
//! cloud-only baseline: plain decoding one round trip per token over the same protocol (a
//! `Verify` with no drafts), and OpenAI-compatible `/v1/completions`.

pub mod batch;
mod completions;
pub mod metrics;
pub mod registry;
pub mod server;
pub mod session;

pub use registry::{Device, LoadError, Registry, Target, TargetSpec};
pub use server::{RunningServer, ServerConfig, State, start};
pub use session::{Limits, Session, SessionError};
