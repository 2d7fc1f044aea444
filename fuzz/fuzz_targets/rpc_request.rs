//! Fuzzes the management socket's request decoding: any bytes as a request line (JSON-RPC
//! framing, batches, every method's parameters including whole device tables with sizes,
//! modes, owners and core masks). Decoding executes nothing, so arbitrary paths in device
//! tables touch no file. Nothing may panic; every request is either a command or an error
//! answer with a JSON-RPC code.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vubd::testing::{decode_rpc_line, RpcDecoded};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (decoded, batch) = decode_rpc_line(text);
    assert!(batch || decoded.len() == 1, "a single request decodes to one");
    for d in decoded {
        if let RpcDecoded::Answer(a) = d {
            if !a.is_null() {
                let code = a["error"]["code"].as_i64().expect("an error answer has a code");
                assert!((-32768..=-32000).contains(&code), "code {code}");
            }
        }
    }
});
