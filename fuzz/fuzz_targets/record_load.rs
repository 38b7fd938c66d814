//! Arbitrary bytes as a record file: parse, validate, the chain queries on whatever
//! parses (valid or not: they must end even on loops), and for valid records the views
//! and a round trip through the store's own encoding.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use snapctl::record::Record;
use snapctl::views;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("/state/vm1.json");
    let Ok(record) = Record::parse(path, data) else {
        return;
    };
    for disk in record.disks.keys() {
        let _ = record.chain(disk);
    }
    for snapshot in &record.snapshots {
        let _ = record.snapshot(&snapshot.name);
        let _ = record.children(&snapshot.name);
    }
    for layer in record.layers.keys() {
        let chain = record.chain_from(layer);
        assert!(chain.len() <= record.layers.len() + 1);
        let _ = record.snapshots_holding(layer);
        let _ = record.dependents(layer);
    }
    let _ = record.layers_needed();
    if record.validate().is_err() {
        return;
    }
    serde_json::to_string(&views::list(&record)).expect("the list encodes");
    for arg in views::qemu_args(&record, None) {
        let _ = views::shell_quote(&arg);
    }
    let json = record.to_json().expect("a valid record encodes");
    let again = Record::parse(path, json.as_bytes()).expect("the store's own output parses");
    again
        .validate()
        .expect("a valid record stays valid through the store");
    assert_eq!(
        again.to_json().expect("encodes"),
        json,
        "encoding is not stable"
    );
});
