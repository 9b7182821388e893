//! The drafter WASI component (wasm32-wasip2): draft loop and speculation policy.
//! Its contract (`wit/`) and implementation come with the drafter/host issue; this crate
//! reserves its place in the workspace.
