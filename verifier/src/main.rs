//! `tandem-verifier`: the cloud verifier. Sessions, the batching scheduler, the target
//! registry and early-exit hints are built by the verifier issue; until then this binary
//! only says so.

fn main() {
    eprintln!("tandem-verifier: the verifier server is not built yet (see the verifier issue)");
    std::process::exit(2);
}
