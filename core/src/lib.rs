//! tandem-core: logic shared by the drafter guest, the edge host and the verifier.
//!
//! Pure functions and small state machines only: no I/O, no tensors. Today it holds the
//! sampling rules ([`sampling`]); the wire protocol and the acceptance / residual math of
//! speculative decoding join it with the verifier.

pub mod sampling;
