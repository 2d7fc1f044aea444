//! Confinement: once set up, each thread of vubd may make only the system calls its job
//! needs (seccomp-BPF, as Firecracker does), and each io_uring only the operations vubd uses
//! (io_uring operations are not system calls: seccomp never sees them).
//!
//! Owns: the filters and their installation. Imports nothing of vubd; every layer may use
//! it. Later features (network backends, kernel front ends, the management socket) add the
//! calls they make to the lists in `seccomp.rs`.

pub mod seccomp;
pub mod uring;

pub use seccomp::{confine, inherited, init, SeccompMode, ThreadKind};
