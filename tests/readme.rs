//! The README's set-up commands keep working: `cargo run` needs to know which of the
//! crate's binaries is the server (src/bin holds tools too), and the first command must
//! start that server with the embedded default (a RAM disk on a socket in this directory).

#[test]
fn cargo_run_starts_the_server() {
    let manifest = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
        .expect("Cargo.toml");
    let package = manifest
        .split("\n[")
        .next()
        .expect("a [package] table first");
    assert!(
        package
            .lines()
            .any(|l| l.trim() == "default-run = \"vubd\""),
        "Cargo.toml's [package] must say default-run = \"vubd\": src/bin has other binaries, \
         and the README's `cargo run --release -- ...` would not know which to run"
    );
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let first_block = readme
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a sh block in the README");
    let commands: Vec<&str> = first_block
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(
        commands,
        [
            "cargo run --release -- --socket-path ./vubd.sock --ram 1G",
            "cargo test"
        ],
        "the README's two set-up commands"
    );
}
