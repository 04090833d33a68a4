//! End-to-end offline pipeline: text embeddings → training + evaluation →
//! HNSW index → sealed artifact directory (read back by
//! [`cascade_artifact::Artifact::load`]).

use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use candle_core::{Device, Tensor};
use cascade_artifact::manifest::{HnswParams, Manifest, FORMAT_VERSION};
use cascade_artifact::{
    Artifact, ServingConfig, FEATURES_FILE, ITEMS_FILE, RANKER_FILE, SERVING_FILE, TRAIN_FILE,
    TWO_TOWER_FILE, VECTORS_FILE,
};
use cascade_data::{atomic_dir, Dataset};
use cascade_model::encoder::TextEncoder;
use cascade_retrieval::{recall_at_k, IndexParams, ItemIndex, INDEX_BASENAME};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::eval::{self, Models, RankingReport, RatingReport};
use crate::train::TrainConfig;
use crate::TrainError;

pub const TEXT_MODEL: &str = "sentence-transformers/all-MiniLM-L6-v2";

/// Embed every item's content text with MiniLM, reusing `cache_dir/text-<hash>.safetensors`
/// when the same model file and texts were embedded before.
pub fn embed_items(
    ds: &Dataset,
    minilm_dir: &Path,
    cache_dir: Option<&Path>,
    progress: bool,
    dev: &Device,
) -> Result<Vec<Vec<f32>>, TrainError> {
    let texts: Vec<String> = ds.items.iter().map(|i| i.content_text()).collect();
    let weights = minilm_dir.join("model.safetensors");
    let mut h = Sha256::new();
    h.update(cascade_artifact::manifest::sha256_file(&weights)?);
    for t in &texts {
        h.update(t.as_bytes());
        h.update(b"\n");
    }
    let key = hex::encode(h.finalize());
    let cache = cache_dir.map(|d| d.join(format!("text-{}.safetensors", &key[..16])));
    if let Some(c) = cache.as_ref().filter(|c| c.exists()) {
        if let Ok(t) = candle_core::safetensors::load(c, &Device::Cpu) {
            if let Some(t) = t.get("text") {
                return Ok(t.to_vec2()?);
            }
        }
    }
    let enc = TextEncoder::load(minilm_dir, dev)?;
    let pb = crate::train::progress(progress, texts.len() as u64, "minilm");
    // Two lanes (even and odd items, so both get a similar length mix), as
    // training runs: `cascade train` gives each op half the cores.
    let half =
        |parity: usize| -> Vec<String> { texts.iter().skip(parity).step_by(2).cloned().collect() };
    let (even, odd) = (half(0), half(1));
    let (a, b) = lanes::two(
        || enc.embed_all(&even, 64, |n| pb.inc(n as u64)),
        || enc.embed_all(&odd, 64, |n| pb.inc(n as u64)),
    )?;
    let (mut a, mut b) = (a?.into_iter(), b?.into_iter());
    let rows: Vec<Vec<f32>> = (0..texts.len())
        .filter_map(|i| if i % 2 == 0 { a.next() } else { b.next() })
        .collect();
    pb.finish_and_clear();
    if let Some(c) = cache {
        if let Some(parent) = c.parent() {
            std::fs::create_dir_all(parent).map_err(|e| TrainError::io(parent, e))?;
        }
        let t = to_tensor(&rows)?;
        let tmp = c.with_extension("tmp");
        t.save_safetensors("text", &tmp)?;
        std::fs::rename(&tmp, &c).map_err(|e| TrainError::io(&c, e))?;
    }
    Ok(rows)
}

fn to_tensor(rows: &[Vec<f32>]) -> Result<Tensor, TrainError> {
    let d = rows.first().map(Vec::len).unwrap_or(0);
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    Ok(Tensor::from_vec(flat, (rows.len(), d), &Device::Cpu)?)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalReport {
    pub dataset_checksum: String,
    pub num_users: usize,
    pub num_items: usize,
    pub num_interactions: usize,
    pub seed: u64,
    pub ranking: RankingReport,
    pub rating: Option<RatingReport>,
    pub seconds: f64,
    /// Wall time of the refit on all interactions (0 when there was none).
    #[serde(default)]
    pub refit_seconds: f64,
}

/// Run the ranking protocol and, with `with_rating`, the rating protocol
/// (beside it, on the second lane). Returns the report and the
/// ranking-protocol models.
pub fn evaluate(
    ds: &Dataset,
    text: &[Vec<f32>],
    cfg: &TrainConfig,
    candidates: usize,
    with_rating: bool,
    dev: &Device,
) -> Result<(EvalReport, Models), TrainError> {
    let t0 = Instant::now();
    let (ranking, rating) = lanes::two(
        || eval::ranking_protocol(ds, text, cfg, candidates, None, dev),
        || {
            with_rating
                .then(|| eval::rating_protocol(ds, text, cfg, dev))
                .transpose()
        },
    )?;
    let (ranking, models) = ranking?;
    Ok((report(ds, cfg, ranking, rating?, t0), models))
}

fn report(
    ds: &Dataset,
    cfg: &TrainConfig,
    ranking: RankingReport,
    rating: Option<RatingReport>,
    t0: Instant,
) -> EvalReport {
    EvalReport {
        dataset_checksum: ds.checksum.clone(),
        num_users: ds.users.len(),
        num_items: ds.items.len(),
        num_interactions: ds.interactions.len(),
        seed: cfg.seed,
        ranking,
        rating,
        seconds: t0.elapsed().as_secs_f64(),
        refit_seconds: 0.0,
    }
}

/// What an artifact records about how its models were made: the serving
/// side's [`ServingConfig`] (`serving.json`) and, for provenance only, the
/// whole training configuration (`train.json`).
#[derive(Debug, Clone)]
pub struct Shipped {
    pub train: TrainConfig,
    pub serving: ServingConfig,
}

impl Shipped {
    /// What the server needs to use `models` as trained with `train`.
    pub fn for_models(train: &TrainConfig, models: &Models, candidates: usize) -> Self {
        Self {
            train: train.clone(),
            serving: ServingConfig {
                two_tower: train.two_tower.clone(),
                ranker: train.ranker.clone(),
                cascade_weights: models.cascade_weights,
                candidates,
            },
        }
    }
}

/// Write a sealed, versioned artifact directory under `root`; returns its path.
/// Everything is written to a temporary sibling first and renamed into place.
pub fn write_artifact(
    root: &Path,
    ds: &Dataset,
    text: &[Vec<f32>],
    models: &Models,
    report: &EvalReport,
    shipped: &Shipped,
    index: IndexParams,
) -> Result<(PathBuf, Manifest), TrainError> {
    let (version, created, dest) = new_version(root, &ds.checksum)?;
    let dim = shipped.serving.two_tower.dim;
    let mut manifest = None;
    atomic_dir(&dest, |dir| -> Result<(), TrainError> {
        let p = |name: &str| dir.join(name);
        models.two_tower.varmap.save(p(TWO_TOWER_FILE))?;
        models.ranker.varmap.save(p(RANKER_FILE))?;
        let rows = |v: &[f32]| -> Result<Tensor, TrainError> {
            Ok(Tensor::from_vec(
                v.to_vec(),
                (v.len() / dim.max(1), dim),
                &Device::Cpu,
            )?)
        };
        candle_core::safetensors::save(
            &[
                ("item_two_tower", rows(&models.item_vecs)?),
                ("item_text", to_tensor(text)?),
                ("user_two_tower", rows(&models.user_vecs)?),
            ]
            .into_iter()
            .collect(),
            p(VECTORS_FILE),
        )?;
        write_json(&p(FEATURES_FILE), &models.space)?;
        write_json(&p(SERVING_FILE), &shipped.serving)?;
        write_json(&p(TRAIN_FILE), &shipped.train)?;
        write_json(&p("metrics.json"), report)?;
        write_curves(&p("loss_curves.svg"), report)?;
        let esc = |s: &str| {
            if s.contains([',', '"', '\n']) {
                format!("\"{}\"", s.replace('"', "\"\""))
            } else {
                s.to_string()
            }
        };
        let mut out = String::from("item_id,title,year,genres\n");
        for it in &ds.items {
            out.push_str(&format!(
                "{},{},{},{}\n",
                esc(&it.id),
                esc(&it.title),
                it.year.map(|y| y.to_string()).unwrap_or_default(),
                esc(&it.genres.join("|"))
            ));
        }
        std::fs::write(p(ITEMS_FILE), out).map_err(|e| TrainError::io(dir, e))?;

        let vectors: Vec<Vec<f32>> = models.item_vecs.chunks(dim).map(<[f32]>::to_vec).collect();
        let queries: Vec<Vec<f32>> = models.user_vecs.chunks(dim).map(<[f32]>::to_vec).collect();
        let (hnsw, build_s) = build_index(dir, &vectors, &queries, index)?;
        let mut metrics = serde_json::to_value(summary(report))
            .map_err(|e| TrainError::Invalid(e.to_string()))?;
        metrics["hnsw_build_seconds"] = build_s.into();
        metrics["served_models"] = serde_json::to_value(&models.trained_on)
            .map_err(|e| TrainError::Invalid(e.to_string()))?;
        manifest = Some(
            Manifest {
                format_version: FORMAT_VERSION,
                model_version: version.clone(),
                created_unix: created,
                dataset_checksum: ds.checksum.clone(),
                num_users: ds.users.len(),
                num_items: ds.items.len(),
                embedding_dim: dim,
                text_dim: text.first().map(Vec::len).unwrap_or(0),
                text_model: TEXT_MODEL.into(),
                hnsw,
                metrics,
                files: Default::default(),
            }
            .seal(dir)?,
        );
        Ok(())
    })?;
    let m = manifest.ok_or_else(|| TrainError::Invalid("artifact manifest not written".into()))?;
    Ok((dest, m))
}

/// Knobs of one offline run beyond the training config.
#[derive(Debug, Clone, Copy)]
pub struct RunOptions {
    /// Retrieved candidates the ranker reorders in the cascade.
    pub candidates: usize,
    /// Also run the 90/10 rating protocol (RMSE/MAE).
    pub with_rating: bool,
    pub index: IndexParams,
}

/// The whole offline pipeline after embedding: evaluate on the split
/// (choosing epochs and cascade weights on validation), refit the shipped
/// models on every interaction with those choices, then write a sealed
/// artifact version under `root`. The report's numbers are the split
/// models'; the manifest's `served_models` says what the shipped ones saw.
pub fn train_artifact(
    root: &Path,
    ds: &Dataset,
    text: &[Vec<f32>],
    cfg: &TrainConfig,
    opts: &RunOptions,
    dev: &Device,
) -> Result<(EvalReport, PathBuf, Manifest), TrainError> {
    // Two lanes: the evaluation (ranking protocol, then the rating protocol
    // if asked) and the refit on all interactions, which follows the
    // evaluation's epoch choices as they are made (see `EpochChoice`).
    let chosen = eval::Chosen::default();
    let t0 = Instant::now();
    let (evaluated, refit) = lanes::two(
        || {
            // However this lane ends (error or panic), the refit must not
            // wait for choices that will never come.
            let _cancel = CancelOnDrop(&chosen);
            let (ranking, models) =
                eval::ranking_protocol(ds, text, cfg, opts.candidates, Some(&chosen), dev)?;
            let rating = opts
                .with_rating
                .then(|| eval::rating_protocol(ds, text, cfg, dev))
                .transpose()?;
            Ok::<_, TrainError>((ranking, rating, models.cascade_weights))
        },
        || {
            let t = Instant::now();
            eval::refit_all(ds, text, cfg, &chosen, dev).map(|m| (m, t.elapsed()))
        },
    )?;
    let (ranking, rating, weights) = evaluated?;
    let (mut models, refit_time) = refit?;
    models.cascade_weights = weights;
    let mut report = report(ds, cfg, ranking, rating, t0);
    report.refit_seconds = refit_time.as_secs_f64();
    let shipped = Shipped::for_models(&eval::refit_config(cfg, &models), &models, opts.candidates);
    let (dir, manifest) = write_artifact(root, ds, text, &models, &report, &shipped, opts.index)?;
    Ok((report, dir, manifest))
}

/// Cancels what is still unchosen when dropped (choices made stay).
struct CancelOnDrop<'a>(&'a eval::Chosen);

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// Concurrent training lanes. Small models on a few cores train faster as
/// two independent runs with single-threaded kernels than as one run whose
/// every op is split across threads (measured: the same wall time on 1 or
/// 2 threads for one run on a 2-core VM), so the offline pipeline runs
/// independent work side by side.
pub mod lanes {
    use crate::TrainError;

    /// Run `a` and `b` at once, each in its own rayon pool (so Cascade's
    /// own data-parallel ops in one lane never queue behind the other's)
    /// with as many threads as Candle uses per op (`RAYON_NUM_THREADS`).
    pub fn two<A: Send, B: Send>(
        a: impl FnOnce() -> A + Send,
        b: impl FnOnce() -> B + Send,
    ) -> Result<(A, B), TrainError> {
        let threads = candle_core::utils::get_num_threads();
        let pool = |name: &'static str| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .thread_name(move |i| format!("{name}-{i}"))
                .build()
                .map_err(|e| TrainError::Invalid(format!("starting a training lane: {e}")))
        };
        let (pa, pb) = (pool("lane-a")?, pool("lane-b")?);
        std::thread::scope(|s| {
            let hb = s.spawn(|| pb.install(b));
            let ra = pa.install(a);
            let rb = hb
                .join()
                .map_err(|_| TrainError::Invalid("a training lane panicked".into()))?;
            Ok((ra, rb))
        })
    }
}

/// Plot every training curve of a report (ranking split, then rating split) as SVG.
pub fn write_curves(path: &Path, report: &EvalReport) -> Result<(), TrainError> {
    let mut curves = report.ranking.curves.clone();
    if let Some(r) = &report.rating {
        curves.extend(r.curves.iter().cloned().map(|mut c| {
            c.model = format!("{} (rating split)", c.model);
            c
        }));
    }
    crate::plot::write_curves(path, &curves)
}

/// Build the HNSW index over `items`, measure recall@100 against exact search
/// with (up to 1,000 of) `queries`, and dump it into `dir`.
fn build_index(
    dir: &Path,
    items: &[Vec<f32>],
    queries: &[Vec<f32>],
    params: IndexParams,
) -> Result<(HnswParams, f64), TrainError> {
    let t0 = Instant::now();
    let idx = ItemIndex::build(items, params)?;
    let build_s = t0.elapsed().as_secs_f64();
    let queries = &queries[..queries.len().min(1000)];
    let recall = recall_at_k(&idx, items, queries, 100.min(items.len()));
    tracing::info!(
        "HNSW over {} items built in {build_s:.2}s; recall@100 vs exact = {recall:.4}",
        items.len()
    );
    idx.save(dir)?;
    let hnsw = HnswParams {
        max_nb_connection: params.max_nb_connection,
        ef_construction: params.ef_construction,
        max_layer: params.max_layer,
        ef_search: params.ef_search,
        distance: "1 - dot, clamped to [0, 2] (cosine on L2-normalised vectors)".into(),
        recall_at_100: recall,
        exact_below: params.exact_below,
    };
    Ok((hnsw, build_s))
}

fn new_version(root: &Path, dataset_checksum: &str) -> Result<(String, u64, PathBuf), TrainError> {
    let mut created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    loop {
        let version = format!(
            "{created:012}-{}",
            &dataset_checksum[..8.min(dataset_checksum.len())]
        );
        let dest = root.join(&version);
        // Never replace a sealed version (a server may be serving it): two
        // versions written in the same second get consecutive stamps, so
        // names stay unique and sort in creation order.
        if !dest.exists() {
            return Ok((version, created, dest));
        }
        created += 1;
    }
}

/// Rebuild the HNSW index of a verified artifact with new parameters into a new
/// version under `root` (weights and vectors copied unchanged, manifest resealed).
pub fn reindex(
    src: &Path,
    root: &Path,
    params: IndexParams,
) -> Result<(PathBuf, Manifest), TrainError> {
    let a = Artifact::load(src, &Device::Cpu)?;
    let vectors = candle_core::safetensors::load(src.join(VECTORS_FILE), &Device::Cpu)?;
    let users: Vec<Vec<f32>> = match vectors.get("user_two_tower") {
        Some(t) => t.to_vec2()?,
        None => Vec::new(),
    };
    let (version, created, dest) = new_version(root, &a.manifest.dataset_checksum)?;
    let mut manifest = None;
    atomic_dir(&dest, |dir| -> Result<(), TrainError> {
        for rel in a.manifest.files.keys() {
            if rel.starts_with(&format!("{INDEX_BASENAME}.hnsw.")) {
                continue;
            }
            let (from, to) = (src.join(rel), dir.join(rel));
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent).map_err(|e| TrainError::io(parent, e))?;
            }
            std::fs::copy(&from, &to).map_err(|e| TrainError::io(&from, e))?;
        }
        let (hnsw, build_s) = build_index(dir, &a.item_vectors, &users, params)?;
        let mut m = a.manifest.clone();
        m.model_version = version.clone();
        m.created_unix = created;
        m.hnsw = hnsw;
        m.metrics["hnsw_build_seconds"] = build_s.into();
        manifest = Some(m.seal(dir)?);
        Ok(())
    })?;
    let m = manifest.ok_or_else(|| TrainError::Invalid("artifact manifest not written".into()))?;
    Ok((dest, m))
}

fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<(), TrainError> {
    let s = serde_json::to_string_pretty(v).map_err(|e| TrainError::Invalid(e.to_string()))?;
    std::fs::write(path, s).map_err(|e| TrainError::io(path, e))
}

/// The headline numbers (no curves).
pub fn summary(r: &EvalReport) -> serde_json::Value {
    serde_json::json!({
        "popularity": r.ranking.popularity,
        "bpr": r.ranking.bpr,
        "two_tower": r.ranking.two_tower,
        "cascade": r.ranking.cascade,
        "cascade_weights": r.ranking.cascade_weights,
        "rmse": r.rating.as_ref().map(|x| x.rmse),
        "mae": r.rating.as_ref().map(|x| x.mae),
        "users_evaluated": r.ranking.users_evaluated,
    })
}
