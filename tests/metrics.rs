//! Prometheus metrics: the exposition is checked by `promtool check metrics` and scraped by a
//! real Prometheus server, and counts exactly what a libblkio client did. Needs the Debian
//! package `prometheus` (promtool and the server): without it the tests fail, saying so,
//! unless VUBD_ALLOW_PROMETHEUS_SKIP=1.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The tool, or None after saying loudly why the test cannot run.
fn need(tool: &str) -> Option<String> {
    have_tool(tool);
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if found.is_none() {
        eprintln!("SKIPPED: {tool} is missing (Debian package prometheus; tests/install-deps.sh installs it)");
        assert_eq!(
            std::env::var("VUBD_ALLOW_PROMETHEUS_SKIP").as_deref(),
            Ok("1"),
            "{tool} is missing: install the Debian package prometheus"
        );
    }
    found
}

/// vubd with a RAM device `d0`, management socket and metrics on a free port; returns the
/// metrics address from its log.
fn server(dir: &Path) -> (Server, String, std::path::PathBuf) {
    let sock = dir.join("d0.sock");
    let rpc = dir.join("rpc.sock");
    let args: Vec<String> = [
        "--socket-path",
        sock.to_str().unwrap(),
        "--ram",
        "16M",
        "--num-queues",
        "2",
        "--rpc-socket",
        rpc.to_str().unwrap(),
        "--metrics-addr",
        "127.0.0.1:0",
        "-m",
        &last_cpu_mask(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let server = Server::spawn(dir, "vubd", &args, &[sock.clone(), rpc.clone()]);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = server.stderr();
        if let Some(addr) = log
            .lines()
            .find_map(|l| l.split("metrics on http://").nth(1))
            .and_then(|r| r.split('/').next())
        {
            return (server, addr.to_string(), rpc);
        }
        assert!(
            Instant::now() < deadline,
            "no metrics address in the log:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn get(addr: &str, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).expect("connect to the metrics endpoint");
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    (head.to_string(), body.to_string())
}

/// The value of the sample whose line starts with `prefix` (name and labels).
fn sample(body: &str, prefix: &str) -> f64 {
    body.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no sample {prefix} in:\n{body}"))
}

fn rpc_call(path: &Path, line: &str) -> String {
    let mut s = std::os::unix::net::UnixStream::connect(path).unwrap();
    writeln!(s, "{line}").unwrap();
    let mut answer = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(s), &mut answer).unwrap();
    answer
}

#[test]
fn exposition_counts_what_the_client_did_and_promtool_accepts_it() {
    let dir = test_dir();
    let (_server, addr, rpc) = server(dir.path());
    let mut c = Client::connect(&dir.path().join("d0.sock"), 2);
    for i in 0..10u64 {
        ok(
            "write",
            c.disks[1].write(i * 4096, &pattern(i, i * 4096, 4096)),
        );
    }
    for i in 0..3u64 {
        ok("read", c.disks[0].read(i * 8192, 8192));
    }
    ok("flush", c.disks[0].flush());
    assert_io_error("read past the end", c.disks[0].read(16 * MIB, 4096));
    let (head, body) = get(&addr, "/metrics");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    let q0 = r#"{device="dev0",queue="0"}"#;
    let q1 = r#"{device="dev0",queue="1"}"#;
    assert_eq!(
        sample(&body, &format!("vubd_writes_completed_total{q1}")),
        10.0
    );
    assert_eq!(
        sample(&body, &format!("vubd_written_bytes_total{q1}")),
        40960.0
    );
    assert_eq!(
        sample(&body, &format!("vubd_reads_completed_total{q0}")),
        4.0
    );
    assert_eq!(
        sample(&body, &format!("vubd_read_bytes_total{q0}")),
        24576.0
    );
    assert_eq!(
        sample(&body, &format!("vubd_flushes_completed_total{q0}")),
        1.0
    );
    assert_eq!(
        sample(
            &body,
            r#"vubd_errors_total{device="dev0",queue="0",op="read",status="ioerr"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(
            &body,
            r#"vubd_request_duration_seconds_count{device="dev0",queue="1",op="write"}"#
        ),
        10.0
    );
    assert_eq!(
        sample(
            &body,
            r#"vubd_request_duration_seconds_bucket{device="dev0",queue="1",op="write",le="+Inf"}"#
        ),
        10.0
    );
    assert_eq!(
        sample(&body, r#"vubd_capacity_bytes{device="dev0"}"#),
        16.0 * MIB as f64
    );
    assert!(
        sample(
            &body,
            r#"vubd_reactor_seconds_total{reactor="0",mode="busy"}"#
        ) > 0.0
    );
    assert_eq!(sample(&body, &format!("vubd_inflight_requests{q0}")), 0.0);
    let (head, _) = get(&addr, "/nope");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");

    // iostat's reset leaves Prometheus counters alone (they must never go backwards).
    let answer = rpc_call(
        &rpc,
        r#"{"jsonrpc":"2.0","id":1,"method":"iostat","params":{"reset":true}}"#,
    );
    assert!(answer.contains("\"result\""), "{answer}");
    let (_, body2) = get(&addr, "/metrics");
    assert_eq!(
        sample(&body2, &format!("vubd_writes_completed_total{q1}")),
        10.0
    );

    let Some(promtool) = need("promtool") else {
        return;
    };
    let mut check = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_real_prometheus_scrapes_it() {
    let Some(prometheus) = need("prometheus") else {
        return;
    };
    let dir = test_dir();
    let (_server, addr, _) = server(dir.path());
    let mut c = Client::connect(&dir.path().join("d0.sock"), 1);
    for i in 0..7u64 {
        ok(
            "write",
            c.disk().write(i * 4096, &pattern(i, i * 4096, 4096)),
        );
    }
    let web = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let cfg = dir.path().join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: vubd\n    static_configs:\n      - targets: ['{addr}']\n"
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let mut prom = Command::new(prometheus)
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start prometheus");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = String::new();
    let found = loop {
        if Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(500));
        let Ok(mut s) = TcpStream::connect(&web) else {
            continue;
        };
        let q = "/api/v1/query?query=vubd_writes_completed_total";
        let _ = write!(
            s,
            "GET {q} HTTP/1.1\r\nHost: {web}\r\nConnection: close\r\n\r\n"
        );
        last.clear();
        let _ = s.read_to_string(&mut last);
        if last.contains(r#""device":"dev0""#) && last.contains(r#""7"]"#) {
            break true;
        }
    };
    let _ = prom.kill();
    let _ = prom.wait();
    assert!(
        found,
        "Prometheus did not report 7 writes within 60 s; last answer:\n{last}\nlog:\n{}",
        std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default()
    );
}
