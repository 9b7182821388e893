//! tandem-client: the device side of tandem. It opens sessions with a verifier (one HTTP/2
//! stream carrying the protocol frames of tandem-core, over h2c or TLS), streams completions
//! from a verifier that drafts by itself (the cloud-sd baseline), and emulates a link on
//! loopback for tests and benchmarks. It also holds the OpenAI-compatible wire types both
//! servers speak ([`openai`]). Among tandem's crates it depends on tandem-core only, so the
//! edge build links no server code.

pub mod auth;
pub mod body;
pub mod cloud_sd;
pub mod drafters;
pub mod endpoint;
pub mod openai;
pub mod session;
pub mod shaper;

pub use endpoint::Endpoint;
pub use session::{SessionClient, SessionReceiver, SessionSender};
