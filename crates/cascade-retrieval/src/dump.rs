//! A bounds-checked walk over hnsw_rs's dump files before hnsw_rs reads
//! them.
//!
//! hnsw_rs trusts its files. A corrupt count or length sizes an allocation,
//! and a failed allocation aborts the process. A data record shorter than the
//! dimension is read past its end (`from_raw_parts` over `dimension`
//! values). A failed read of a data record calls `process::exit(1)`. None of
//! these can be caught as a panic can, and a file whose manifest checksum
//! matches can still carry them (a bad build that was sealed afterwards). So
//! every field hnsw_rs relies on is checked here first, each count against
//! the bytes left in its file, and the files must end where the walk ends.
//! The walk streams both files and holds one ID per point.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

// The format, as hnsw_rs 0.3 writes it (`hnswio.rs`), in native byte order.
const MAGIC_DESCR_3: u32 = 0x002a_6771;
const MAGIC_DESCR_4: u32 = 0x002a_6779;
const MAGIC_LAYER: u32 = 0x000a_676f;
const MAGIC_POINT: u32 = 0x000a_678f;
const MAGIC_DATA: u32 = 0xa67f_0000;
const MAX_LAYERS: u8 = 16;
/// hnsw_rs's loader reads every point's layer and rank, which only a full
/// dump writes.
const FULL_DUMP: u8 = 1;
const WORD: u64 = std::mem::size_of::<usize>() as u64;

struct Reader<R> {
    inner: R,
    /// The file's name, for errors.
    name: String,
    pos: u64,
    len: u64,
}

fn open(path: PathBuf) -> Result<Reader<BufReader<File>>, String> {
    let file = File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let len = file
        .metadata()
        .map_err(|e| format!("{}: {e}", path.display()))?
        .len();
    let name = path
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    Ok(Reader::new(
        BufReader::with_capacity(1 << 20, file),
        name,
        len,
    ))
}

impl<R: Read> Reader<R> {
    fn new(inner: R, name: String, len: u64) -> Self {
        Self {
            inner,
            name,
            pos: 0,
            len,
        }
    }

    fn left(&self) -> u64 {
        self.len - self.pos
    }

    fn bad(&self, msg: impl std::fmt::Display) -> String {
        format!("{} at byte {}: {msg}", self.name, self.pos)
    }

    fn take<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        if self.left() < N as u64 {
            return Err(self.bad(format!("the file ends inside the {what}")));
        }
        let mut b = [0u8; N];
        self.inner
            .read_exact(&mut b)
            .map_err(|e| self.bad(format!("reading the {what}: {e}")))?;
        self.pos += N as u64;
        Ok(b)
    }

    fn u8(&mut self, what: &str) -> Result<u8, String> {
        Ok(self.take::<1>(what)?[0])
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        Ok(u32::from_ne_bytes(self.take(what)?))
    }

    fn i32(&mut self, what: &str) -> Result<i32, String> {
        Ok(i32::from_ne_bytes(self.take(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        Ok(u64::from_ne_bytes(self.take(what)?))
    }

    fn word(&mut self, what: &str) -> Result<u64, String> {
        Ok(usize::from_ne_bytes(self.take(what)?) as u64)
    }

    fn magic(&mut self, want: u32, what: &str) -> Result<(), String> {
        let got = self.u32(what)?;
        if got != want {
            return Err(self.bad(format!("{what} is {got:#x}, expected {want:#x}")));
        }
        Ok(())
    }

    /// A count of records of at least `each` bytes that must fit in what
    /// is left of the file.
    fn count(&mut self, what: &str, each: u64) -> Result<u64, String> {
        let n = self.word(what)?;
        if u128::from(n) * u128::from(each) > u128::from(self.left()) {
            return Err(self.bad(format!(
                "{what} {n} cannot fit in the {} bytes left",
                self.left()
            )));
        }
        Ok(n)
    }

    /// `buf.len()` bytes into `buf`.
    fn fill(&mut self, buf: &mut [u8], what: &str) -> Result<(), String> {
        if buf.len() as u64 > self.left() {
            return Err(self.bad(format!("the file ends inside the {what}")));
        }
        self.inner
            .read_exact(buf)
            .map_err(|e| self.bad(format!("reading the {what}: {e}")))?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn name(&mut self, what: &str) -> Result<String, String> {
        let n = self.word(what)?;
        if n > 256 || n > self.left() {
            return Err(self.bad(format!("{what} length {n}")));
        }
        let mut b = vec![0u8; n as usize];
        self.fill(&mut b, what)?;
        String::from_utf8(b).map_err(|_| self.bad(format!("the {what} is not UTF-8")))
    }

    fn end(&self) -> Result<(), String> {
        match self.left() {
            0 => Ok(()),
            n => Err(self.bad(format!("{n} bytes after the end of the dump"))),
        }
    }
}

/// Check `dir/<basename>.hnsw.{graph,data}` as hnsw_rs will read them; an
/// error names the file, the byte and what is wrong.
pub(crate) fn check(dir: &Path, basename: &str) -> Result<(), String> {
    let g = open(dir.join(format!("{basename}.hnsw.graph")))?;
    let d = open(dir.join(format!("{basename}.hnsw.data")))?;
    walk(g, d)
}

/// [`check`] on the two files' bytes (for the fuzz target in `tests/fuzz`).
#[doc(hidden)]
pub fn check_bytes(graph: &[u8], data: &[u8]) -> Result<(), String> {
    walk(
        Reader::new(graph, "graph".into(), graph.len() as u64),
        Reader::new(data, "data".into(), data.len() as u64),
    )
}

fn walk(mut g: Reader<impl Read>, mut d: Reader<impl Read>) -> Result<(), String> {
    let v4 = match g.u32("description magic")? {
        MAGIC_DESCR_4 => true,
        MAGIC_DESCR_3 => false,
        other => return Err(g.bad(format!("unknown description magic {other:#x}"))),
    };
    let mode = g.u8("dump mode")?;
    if mode != FULL_DUMP {
        return Err(g.bad(format!("dump mode {mode}: only full dumps load")));
    }
    g.u8("connection count")?;
    if v4 {
        let scale = f64::from_ne_bytes(g.take("level scale")?);
        if !(scale.is_finite() && scale > 0.0) {
            return Err(g.bad(format!("level scale {scale}")));
        }
    }
    let neighbour_layers = g.u8("layer count")?;
    if neighbour_layers > MAX_LAYERS {
        return Err(g.bad(format!("{neighbour_layers} layers (at most {MAX_LAYERS})")));
    }
    g.word("ef")?;
    // A point takes at least its magic, ID, layer, rank and one count per layer.
    let point_bytes = 4 + WORD + 1 + 4 + WORD * u64::from(neighbour_layers);
    let points = g.count("point count", point_bytes)?;
    let dim = g.word("dimension")?;
    g.name("distance name")?;
    let t = g.name("type name")?;
    if t != "f32" {
        return Err(g.bad(format!("vectors of {t:?}, expected f32")));
    }
    let layers = g.u8("indexation layer count")?;
    if layers == 0 || layers > MAX_LAYERS {
        return Err(g.bad(format!("{layers} indexation layers")));
    }
    let neighbour_bytes = WORD + 1 + 4 + 4;
    // Bounded by `points`, itself bounded by the file's length.
    let mut ids: Vec<u64> = Vec::with_capacity(points as usize);
    let mut sizes = [0u64; MAX_LAYERS as usize];
    // The highest rank any neighbour names, per layer.
    let mut highest = [-1i64; MAX_LAYERS as usize];
    for l in 0..layers {
        g.magic(MAGIC_LAYER, "layer magic")?;
        let n = g.count("layer size", point_bytes)?;
        if ids.len() as u64 + n > points {
            return Err(g.bad(format!(
                "the layers hold more than the {points} points described"
            )));
        }
        sizes[usize::from(l)] = n;
        for r in 0..n {
            g.magic(MAGIC_POINT, "point magic")?;
            ids.push(g.word("point ID")?);
            let (pl, pr) = (g.u8("point layer")?, g.i32("point rank")?);
            if pl != l || i64::from(pr) != r as i64 {
                return Err(g.bad(format!(
                    "point ({pl}, {pr}) stored as point {r} of layer {l}"
                )));
            }
            for _ in 0..neighbour_layers {
                let k = g.count("neighbour count", neighbour_bytes)?;
                for _ in 0..k {
                    g.word("neighbour ID")?;
                    let (nl, nr) = (g.u8("neighbour layer")?, g.i32("neighbour rank")?);
                    if nl >= layers || nr < 0 {
                        return Err(g.bad(format!("neighbour ({nl}, {nr})")));
                    }
                    let h = &mut highest[usize::from(nl)];
                    *h = (*h).max(i64::from(nr));
                    // hnsw_rs sorts neighbours by distance and panics on a NaN.
                    let dist = f32::from_ne_bytes(g.take("neighbour distance")?);
                    if dist.is_nan() {
                        return Err(g.bad("a neighbour distance is NaN"));
                    }
                }
            }
        }
    }
    if ids.len() as u64 != points {
        return Err(g.bad(format!(
            "the layers hold {} points, the description {points}",
            ids.len()
        )));
    }
    for (l, (&h, &n)) in highest.iter().zip(&sizes).enumerate() {
        if h >= n as i64 {
            return Err(g.bad(format!(
                "a neighbour is point {h} of layer {l}, which holds {n}"
            )));
        }
    }
    g.word("entry point ID")?;
    let (el, er) = (g.u8("entry point layer")?, g.i32("entry point rank")?);
    if el >= layers || er < 0 || er as u64 >= sizes[usize::from(el)] {
        return Err(g.bad(format!("entry point ({el}, {er})")));
    }
    g.end()?;

    d.magic(MAGIC_DATA, "data magic")?;
    let data_dim = d.word("data dimension")?;
    if data_dim != dim {
        return Err(d.bad(format!("dimension {data_dim}, the graph says {dim}")));
    }
    let vector_bytes = dim
        .checked_mul(4)
        .ok_or_else(|| d.bad(format!("dimension {dim}")))?;
    // At most 4 × dimension bytes, and the data file holds that much.
    if vector_bytes > d.left() {
        return Err(d.bad(format!("dimension {dim} does not fit in the file")));
    }
    let mut vector = vec![0u8; vector_bytes as usize];
    for &id in &ids {
        d.magic(MAGIC_DATA, "record magic")?;
        let got = d.u64("record ID")?;
        if got != id {
            return Err(d.bad(format!("record of point {got}, the graph has {id} next")));
        }
        let len = d.u64("record length")?;
        if len != vector_bytes {
            return Err(d.bad(format!(
                "record length {len}, expected {vector_bytes} ({dim} f32)"
            )));
        }
        d.fill(&mut vector, "vector")?;
        if vector
            .chunks_exact(4)
            .any(|c| !f32::from_ne_bytes([c[0], c[1], c[2], c[3]]).is_finite())
        {
            return Err(d.bad(format!("the vector of point {id} is not finite")));
        }
    }
    d.end()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{IndexParams, ItemIndex, INDEX_BASENAME};

    /// A saved index of `n` random unit vectors and its two files' bytes.
    fn saved(n: usize) -> (tempfile::TempDir, Vec<u8>, Vec<u8>) {
        let items = crate::unit_vectors::unit_vectors(n, 8, 3);
        let idx = ItemIndex::build(&items, IndexParams::default()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        idx.save(dir.path()).unwrap();
        let graph = std::fs::read(dir.path().join("items.hnsw.graph")).unwrap();
        let data = std::fs::read(dir.path().join("items.hnsw.data")).unwrap();
        (dir, graph, data)
    }

    fn write(dir: &Path, graph: &[u8], data: &[u8]) {
        std::fs::write(dir.join("items.hnsw.graph"), graph).unwrap();
        std::fs::write(dir.join("items.hnsw.data"), data).unwrap();
    }

    /// Loading must be an error naming `says`; hnsw_rs is never reached.
    fn refused(dir: &Path, says: &str) {
        let e = ItemIndex::load(dir, IndexParams::default())
            .err()
            .expect("a corrupt dump must be refused");
        assert!(e.to_string().contains(says), "{says}: {e}");
    }

    /// Offset of the first layer's size: the description, its two names,
    /// the layer count and the layer magic.
    fn first_layer_size_at(graph: &[u8]) -> usize {
        let names = 4 + 1 + 1 + 8 + 1 + 8 + 8 + 8;
        let word = |at: usize| usize::from_ne_bytes(graph[at..at + 8].try_into().unwrap());
        let dist_len = word(names);
        let type_at = names + 8 + dist_len;
        type_at + 8 + word(type_at) + 1 + 4
    }

    /// The fuzz target's seed (`scripts/fuzz.sh`): a real 60-item dump as
    /// the graph's length (u32, little-endian), the graph, the data.
    #[test]
    #[ignore = "writes the fuzz seed to $CASCADE_FUZZ_SEED"]
    fn write_fuzz_seed() {
        let out = std::env::var("CASCADE_FUZZ_SEED").expect("CASCADE_FUZZ_SEED");
        let (_dir, graph, data) = saved(60);
        let len = u32::try_from(graph.len()).unwrap().to_le_bytes();
        std::fs::write(out, [&len[..], &graph, &data].concat()).unwrap();
    }

    #[test]
    fn a_sound_dump_passes_and_loads() {
        let (dir, _, _) = saved(300);
        check(dir.path(), INDEX_BASENAME).unwrap();
        let idx = ItemIndex::load(dir.path(), IndexParams::default()).unwrap();
        assert_eq!(idx.len, 300);
    }

    #[test]
    fn corrupt_counts_and_lengths_are_errors_before_hnsw_rs_sees_them() {
        let (dir, graph, data) = saved(300);
        let word = |v: u64| v.to_ne_bytes();
        // A layer of 2^40 points: hnsw_rs would reserve 8 TiB and the
        // failed allocation would abort the process.
        let at = first_layer_size_at(&graph);
        let first = u64::from_ne_bytes(graph[at..at + 8].try_into().unwrap());
        assert!(first > 0 && first <= 300, "layer size offset: read {first}");
        let mut g = graph.clone();
        g[at..at + 8].copy_from_slice(&word(1 << 40));
        write(dir.path(), &g, &data);
        refused(dir.path(), "layer size 1099511627776 cannot fit");
        // The described point count.
        let mut g = graph.clone();
        g[23..31].copy_from_slice(&word(u64::MAX));
        write(dir.path(), &g, &data);
        refused(dir.path(), "point count");
        // A data record shorter than the dimension: hnsw_rs would read past
        // its end.
        let mut d = data.clone();
        let rec = 4 + 8 + 4 + 8; // header: magic and dimension
        d[rec..rec + 8].copy_from_slice(&word(4));
        write(dir.path(), &graph, &d);
        refused(dir.path(), "record length 4, expected 32");
        // A data file cut short: hnsw_rs's failed read would exit(1).
        write(dir.path(), &graph, &data[..data.len() - 10]);
        refused(dir.path(), "the file ends inside the vector");
        // Bytes after the end of either file.
        write(dir.path(), &graph, &[data.as_slice(), b"x"].concat());
        refused(dir.path(), "1 bytes after the end");
        write(dir.path(), &[graph.as_slice(), b"xy"].concat(), &data);
        refused(dir.path(), "2 bytes after the end");
        // The sound files still load.
        write(dir.path(), &graph, &data);
        ItemIndex::load(dir.path(), IndexParams::default()).unwrap();
    }

    #[test]
    fn any_changed_byte_is_refused_or_loads_without_a_panic() {
        let (dir, graph, data) = saved(60);
        // Each of the first 400 bytes of both files and every 97th after,
        // set to 0xff: the walk refuses the change, or hnsw_rs loads the
        // files without a panic (let alone an abort or an exit).
        let mut loaded = 0;
        let mut refused = 0;
        let mut panicked = Vec::new();
        let picks = |len: usize| (0..len.min(400)).chain((400..len).step_by(97));
        for (which, len) in [(0, graph.len()), (1, data.len())] {
            for at in picks(len) {
                let (mut g, mut d) = (graph.clone(), data.clone());
                let b = if which == 0 { &mut g[at] } else { &mut d[at] };
                if *b == 0xff {
                    continue;
                }
                *b = 0xff;
                write(dir.path(), &g, &d);
                let r = std::panic::catch_unwind(|| {
                    ItemIndex::load(dir.path(), IndexParams::default()).map(|i| i.len)
                });
                match r {
                    Ok(Ok(_)) => loaded += 1,
                    Ok(Err(_)) => refused += 1,
                    Err(_) => panicked.push((which, at)),
                }
            }
        }
        assert!(refused > 100, "refused {refused}, loaded {loaded}");
        assert!(
            panicked.is_empty(),
            "hnsw_rs panicked after the walk passed: {panicked:?}"
        );
    }
}
