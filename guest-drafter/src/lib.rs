//! The drafter WASI component (wasm32-wasip2): draft loop, speculation policy and the
//! client half of acceptance, behind the `tandem:drafter` world (`wit/drafter.wit`).
//!
//! The logic is a sans-IO state machine ([`machine`]) over a [`machine::DraftModel`]; in
//! the component that model is the host's wasi:nn graph ([`nn`]).

pub mod machine;
pub mod policy;

#[cfg(target_arch = "wasm32")]
mod component;
