//! A short fuzz run of every target, part of the test command (`ci/fuzz` runs longer).
//! Fails on any crash; the seed is printed so that a failure can be repeated with
//! `tandem-fuzz --seed`.

use std::time::Duration;

use tandem_fuzz::{Target, fuzz};

#[test]
fn every_target_survives_a_short_run() {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let dir = tempfile_dir();
    for t in Target::ALL {
        let r = fuzz(t, Duration::from_secs(8), seed, &dir).unwrap();
        println!(
            "{}: seed {seed}, {} execs, {} valid, reached {:?}",
            t.name(),
            r.execs,
            r.valid,
            r.reached
        );
        assert!(
            r.crashes.is_empty(),
            "{}: seed {seed}: crashes {:?}",
            t.name(),
            r.crashes
        );
        assert!(r.execs > 10, "{}: only {} executions", t.name(), r.execs);
        assert!(
            r.valid > 0,
            "{}: no input was valid: the generators are broken",
            t.name()
        );
        if t == Target::Frames {
            // Every message type of both directions decoded at least once.
            for k in [
                "client:Hello",
                "client:Prefill",
                "client:Verify",
                "client:Cancel",
                "client:Close",
                "server:Accepted",
                "server:First",
                "server:Hint",
                "server:Result",
                "server:Error",
            ] {
                assert!(
                    r.reached.iter().any(|(n, _)| n == k),
                    "{k} never decoded: {:?}",
                    r.reached
                );
            }
        }
    }
}

fn tempfile_dir() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("tandem-fuzz-crashes-{}", std::process::id()))
}
