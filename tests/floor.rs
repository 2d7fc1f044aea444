//! vubd-floor, the reference `tuning/compare.sh` reports the null QD1 latency against: it
//! runs, its ideal device serves every request correctly (the tool fails otherwise), and it
//! prints every figure the report reads. No figure is compared with a bound: timings are
//! for benchmarks.

use std::process::Command;

#[test]
fn floor_reports_the_line_and_ring_floors() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        eprintln!(
            "SKIPPED floor_reports_the_line_and_ring_floors: needs 2 CPUs, this machine has 1"
        );
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_vubd-floor"))
        .args(["--cpus", &format!("0,{}", cpus - 1), "--seconds", "0.2"])
        .output()
        .expect("run vubd-floor");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "vubd-floor failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |name: &str| -> f64 {
        text.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("no {name}= in {text:?}"))
            .parse()
            .unwrap_or_else(|e| panic!("{name} in {text:?}: {e}"))
    };
    // The report reads the first number as the line's p50.
    let first: f64 = text.split_whitespace().next().unwrap().parse().unwrap();
    assert_eq!(first, field("floor_p50_us"));
    for name in [
        "floor_p99_us",
        "ring_p50_us",
        "ring_p99_us",
        "ring_nodata_p50_us",
        "round_trips",
    ] {
        assert!(field(name) > 0.0, "{name} in {text:?}");
    }
}
