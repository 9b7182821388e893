//! tandem-core: logic shared by the drafter guest, the edge host and the verifier.
//!
//! Pure functions and small state machines only: no I/O, no tensors: the sampling rules
//! ([`sampling`]), the session wire format ([`protocol`]) and the acceptance / residual
//! math of speculative decoding ([`accept`]).

pub mod accept;
pub mod protocol;
pub mod sampling;
