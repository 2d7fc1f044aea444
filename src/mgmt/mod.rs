//! Management: the JSON-RPC socket (`rpc`, its methods in `methods`) and the Prometheus
//! metrics endpoint (`metrics`). Both run on threads of their own, under the control
//! thread's seccomp filter, and reach devices only through the registry: a slow or stuck
//! client holds up nothing but itself.
//!
//! Owns: the wire formats of management. Imports the registry; nothing imports it but the
//! top level.

pub mod methods;
pub mod metrics;
pub mod rpc;
