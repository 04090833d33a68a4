//! Shared by cascade-core's and cascade-server's tests (included by path).

/// Copy version `src` to `root/name` with `corrupt` applied to its HNSW
/// graph file, then re-seal the manifest: the checksums match, as they do
/// for a bad build or a bad copy that was sealed afterwards.
pub fn corrupt_copy(
    src: &std::path::Path,
    root: &std::path::Path,
    name: &str,
    corrupt: impl Fn(&mut Vec<u8>),
) -> std::path::PathBuf {
    let dst = root.join(name);
    std::fs::create_dir_all(&dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
    }
    let graph = dst.join(format!("{}.hnsw.graph", cascade_retrieval::INDEX_BASENAME));
    let mut bytes = std::fs::read(&graph).unwrap();
    corrupt(&mut bytes);
    std::fs::write(&graph, bytes).unwrap();
    let text = std::fs::read_to_string(dst.join("manifest.json")).unwrap();
    let m: cascade_artifact::manifest::Manifest = serde_json::from_str(&text).unwrap();
    m.seal(&dst).unwrap();
    dst
}
