//! Arbitrary bytes from a QMP peer: line framing (whole and in pieces, which must
//! agree), the depth-limited JSON parse, greeting parsing, message classification.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    qmp_client::fuzz_decode(data);
});
