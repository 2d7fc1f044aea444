//! `--watch SECS [--count N]`: a report per interval from two successive answers.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cli::WatchArgs;
use crate::client::{Client, Error};
use crate::Output;

/// Calls `method` every interval and prints `render(previous, current, seconds between)`;
/// tables are separated by a blank line. With --json each raw answer is printed instead,
/// one line each, the first at once (whoever reads them computes their own rates).
/// Runs until interrupted, or for --count reports.
pub fn run(
    client: &mut Client,
    args: &WatchArgs,
    out: &mut Output,
    method: &str,
    params: &Value,
    render: impl Fn(&Value, &Value, f64) -> Result<String, Error>,
) -> Result<(), Error> {
    let interval = args.watch.unwrap_or(Duration::from_secs(1));
    let start = Instant::now();
    let mut prev = (client.call(method, params.clone())?, Instant::now());
    let mut printed = 0u64;
    if out.json {
        out.print(&format!("{}\n", prev.0))?;
        printed += 1;
    }
    let mut tick = 1u32;
    while args.count.is_none_or(|n| printed < n) {
        // Deadlines from the start, so the slow calls do not add up to a drift.
        sleep_until(start + interval * tick);
        tick = tick.saturating_add(1);
        let cur = (client.call(method, params.clone())?, Instant::now());
        let text = if out.json {
            format!("{}\n", cur.0)
        } else {
            let secs = cur.1.duration_since(prev.1).as_secs_f64();
            let table = render(&prev.0, &cur.0, secs)?;
            if printed == 0 {
                table
            } else {
                format!("\n{table}")
            }
        };
        out.print(&text)?;
        printed += 1;
        prev = cur;
    }
    Ok(())
}

fn sleep_until(deadline: Instant) {
    std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
}
