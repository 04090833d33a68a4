//! Any bytes as an HNSW dump: the walk in `cascade-retrieval` refuses them,
//! or hnsw_rs loads them (or refuses them) without a panic, an abort or an
//! exit. libFuzzer reports any of those as a crash.
//!
//! The input is the graph file's length (4 bytes, little-endian), the graph
//! file, then the data file; `scripts/fuzz.sh` seeds it with a real dump.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Some((len, rest)) = input.split_first_chunk::<4>() else {
        return;
    };
    let len = (u32::from_le_bytes(*len) as usize).min(rest.len());
    let (graph, data) = rest.split_at(len);
    if cascade_retrieval::check_dump_bytes(graph, data).is_err() {
        return;
    }
    let dir = tempfile::tempdir().expect("a temporary directory");
    std::fs::write(dir.path().join("items.hnsw.graph"), graph).expect("writing the graph");
    std::fs::write(dir.path().join("items.hnsw.data"), data).expect("writing the data");
    let _ = cascade_retrieval::ItemIndex::load(dir.path(), Default::default());
});
