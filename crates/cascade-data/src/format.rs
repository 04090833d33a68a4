//! Cascade's dataset format: three CSV files with a header row in one directory.
//!
//! * `interactions.csv` — `user_id,item_id,rating[,timestamp]`
//! * `items.csv` — `item_id,title[,year][,genres][,description]`; `genres` is `|`-separated
//! * `users.csv` (optional) — `user_id` plus any number of categorical columns
//!
//! IDs are strings. Every row error names the file and the 1-based line, so a
//! user training on their own catalogue can find the bad row at once.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::DataError;

pub const INTERACTIONS_FILE: &str = "interactions.csv";
pub const ITEMS_FILE: &str = "items.csv";
pub const USERS_FILE: &str = "users.csv";

#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub id: String,
    pub title: String,
    pub year: Option<i32>,
    pub genres: Vec<String>,
    pub description: String,
}

impl Item {
    /// The sentence the text encoder sees for this item.
    pub fn content_text(&self) -> String {
        let mut s = self.title.clone();
        if let Some(y) = self.year {
            s.push_str(&format!(" ({y})"));
        }
        if !self.genres.is_empty() {
            s.push_str(". Genres: ");
            s.push_str(&self.genres.join(", "));
        }
        if !self.description.is_empty() {
            s.push_str(". ");
            s.push_str(&self.description);
        }
        s
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct User {
    pub id: String,
    /// Categorical feature values, in the order of [`Dataset::user_feature_names`].
    pub features: Vec<String>,
}

/// One interaction with dense indices into [`Dataset::users`] and [`Dataset::items`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interaction {
    pub user: u32,
    pub item: u32,
    pub rating: f32,
    pub timestamp: i64,
}

#[derive(Debug, Clone)]
pub struct Dataset {
    pub items: Vec<Item>,
    pub users: Vec<User>,
    pub user_feature_names: Vec<String>,
    pub interactions: Vec<Interaction>,
    /// sha256 over the three files' bytes, in a fixed order: identifies the data an artifact came from.
    pub checksum: String,
}

struct Rows {
    path: PathBuf,
    reader: csv::Reader<BufReader<File>>,
    header: Vec<String>,
}

impl Rows {
    fn open(path: &Path) -> Result<Self, DataError> {
        let file = File::open(path).map_err(|e| DataError::io(path, e))?;
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(true)
            .flexible(true)
            .from_reader(BufReader::new(file));
        let header: Vec<String> = reader
            .headers()
            .map_err(|e| DataError::row(path, 1, e.to_string()))?
            .iter()
            .map(|h| h.trim().to_string())
            .collect();
        if header.iter().all(|h| h.is_empty()) {
            return Err(DataError::row(path, 1, "empty file: expected a header row"));
        }
        Ok(Self {
            path: path.to_path_buf(),
            reader,
            header,
        })
    }

    fn column(&self, name: &str) -> Result<usize, DataError> {
        self.header.iter().position(|h| h == name).ok_or_else(|| {
            DataError::row(
                &self.path,
                1,
                format!(
                    "missing required column `{name}` (header: {:?})",
                    self.header
                ),
            )
        })
    }

    fn optional(&self, name: &str) -> Option<usize> {
        self.header.iter().position(|h| h == name)
    }

    /// Visit each data row with its 1-based line number.
    fn for_each(
        mut self,
        mut f: impl FnMut(&Path, u64, &csv::StringRecord) -> Result<(), DataError>,
    ) -> Result<usize, DataError> {
        let mut record = csv::StringRecord::new();
        let mut n = 0;
        loop {
            let more = self.reader.read_record(&mut record).map_err(|e| {
                let line = e.position().map(|p| p.line()).unwrap_or(0);
                DataError::row(&self.path, line, e.to_string())
            })?;
            if !more {
                break;
            }
            let line = record.position().map(|p| p.line()).unwrap_or(0);
            if record.len() < self.header.len() {
                return Err(DataError::row(
                    &self.path,
                    line,
                    format!(
                        "expected {} columns ({}), found {}",
                        self.header.len(),
                        self.header.join(","),
                        record.len()
                    ),
                ));
            }
            f(&self.path, line, &record)?;
            n += 1;
        }
        if n == 0 {
            return Err(DataError::row(
                &self.path,
                2,
                "no data rows after the header",
            ));
        }
        Ok(n)
    }
}

fn field<'a>(
    rec: &'a csv::StringRecord,
    idx: usize,
    name: &str,
    path: &Path,
    line: u64,
) -> Result<&'a str, DataError> {
    let v = rec.get(idx).unwrap_or("").trim();
    if v.is_empty() {
        return Err(DataError::row(path, line, format!("empty `{name}`")));
    }
    Ok(v)
}

impl Dataset {
    pub fn num_users(&self) -> usize {
        self.users.len()
    }
    pub fn num_items(&self) -> usize {
        self.items.len()
    }

    /// Read a dataset directory in Cascade's format.
    pub fn load(dir: &Path) -> Result<Self, DataError> {
        let mut hasher = Sha256::new();
        let items_path = dir.join(ITEMS_FILE);
        let inter_path = dir.join(INTERACTIONS_FILE);
        let users_path = dir.join(USERS_FILE);
        for p in [&items_path, &inter_path] {
            if !p.exists() {
                return Err(DataError::Missing(p.clone()));
            }
        }
        for p in [&items_path, &users_path, &inter_path] {
            if p.exists() {
                hasher.update(std::fs::read(p).map_err(|e| DataError::io(p, e))?);
            }
            hasher.update(b"\0");
        }

        let (items, item_index) = read_items(&items_path)?;

        // Users (optional file; users seen only in interactions get empty features).
        let mut users = Vec::new();
        let mut user_index: HashMap<String, u32> = HashMap::new();
        let mut user_feature_names = Vec::new();
        if users_path.exists() {
            let rows = Rows::open(&users_path)?;
            let c_id = rows.column("user_id")?;
            let feature_cols: Vec<usize> = (0..rows.header.len()).filter(|&c| c != c_id).collect();
            user_feature_names = feature_cols
                .iter()
                .map(|&c| rows.header[c].clone())
                .collect();
            rows.for_each(|path, line, rec| {
                let id = field(rec, c_id, "user_id", path, line)?.to_string();
                let features = feature_cols
                    .iter()
                    .map(|&c| rec.get(c).unwrap_or("").trim().to_string())
                    .collect();
                if user_index.insert(id.clone(), users.len() as u32).is_some() {
                    return Err(DataError::row(
                        path,
                        line,
                        format!("duplicate user_id {id:?}"),
                    ));
                }
                users.push(User { id, features });
                Ok(())
            })?;
        }

        // Interactions.
        let rows = Rows::open(&inter_path)?;
        let (c_user, c_item, c_rating) = (
            rows.column("user_id")?,
            rows.column("item_id")?,
            rows.column("rating")?,
        );
        let c_ts = rows.optional("timestamp");
        let mut interactions = Vec::new();
        let n_features = user_feature_names.len();
        rows.for_each(|path, line, rec| {
            let uid = field(rec, c_user, "user_id", path, line)?;
            let iid = field(rec, c_item, "item_id", path, line)?;
            let r = field(rec, c_rating, "rating", path, line)?;
            let rating: f32 = r
                .parse()
                .ok()
                .filter(|v: &f32| v.is_finite())
                .ok_or_else(|| DataError::row(path, line, format!("non-numeric `rating` {r:?}")))?;
            let timestamp = match c_ts.map(|c| rec.get(c).unwrap_or("").trim()) {
                None | Some("") => 0,
                Some(t) => t.parse::<f64>().map(|t| t as i64).map_err(|_| {
                    DataError::row(path, line, format!("non-numeric `timestamp` {t:?}"))
                })?,
            };
            let item = *item_index.get(iid).ok_or_else(|| {
                DataError::row(
                    path,
                    line,
                    format!("unknown item_id {iid:?} (not in {ITEMS_FILE})"),
                )
            })?;
            let user = match user_index.get(uid) {
                Some(&u) => u,
                None => {
                    let u = users.len() as u32;
                    user_index.insert(uid.to_string(), u);
                    users.push(User {
                        id: uid.to_string(),
                        features: vec![String::new(); n_features],
                    });
                    u
                }
            };
            interactions.push(Interaction {
                user,
                item,
                rating,
                timestamp,
            });
            Ok(())
        })?;

        Ok(Self {
            items,
            users,
            user_feature_names,
            interactions,
            checksum: hex::encode(hasher.finalize()),
        })
    }

    /// Write this dataset in Cascade's format into `dir` atomically: a
    /// temporary sibling directory is filled, then renamed into place.
    pub fn write(&self, dir: &Path) -> Result<(), DataError> {
        crate::atomic_dir(dir, |tmp| {
            let mut w =
                csv::Writer::from_path(tmp.join(ITEMS_FILE)).map_err(DataError::csv(tmp))?;
            w.write_record(["item_id", "title", "year", "genres", "description"])
                .map_err(DataError::csv(tmp))?;
            for it in &self.items {
                let year = it.year.map(|y| y.to_string()).unwrap_or_default();
                w.write_record([
                    it.id.as_str(),
                    &it.title,
                    &year,
                    &it.genres.join("|"),
                    &it.description,
                ])
                .map_err(DataError::csv(tmp))?;
            }
            w.flush().map_err(|e| DataError::io(tmp, e))?;

            let mut w =
                csv::Writer::from_path(tmp.join(USERS_FILE)).map_err(DataError::csv(tmp))?;
            let mut header = vec!["user_id".to_string()];
            header.extend(self.user_feature_names.iter().cloned());
            w.write_record(&header).map_err(DataError::csv(tmp))?;
            for u in &self.users {
                let mut row = vec![u.id.clone()];
                row.extend(u.features.iter().cloned());
                w.write_record(&row).map_err(DataError::csv(tmp))?;
            }
            w.flush().map_err(|e| DataError::io(tmp, e))?;

            let path = tmp.join(INTERACTIONS_FILE);
            let mut f =
                std::io::BufWriter::new(File::create(&path).map_err(|e| DataError::io(&path, e))?);
            writeln!(f, "user_id,item_id,rating,timestamp").map_err(|e| DataError::io(&path, e))?;
            let mut w = csv::Writer::from_writer(f);
            for x in &self.interactions {
                w.write_record([
                    self.users[x.user as usize].id.as_str(),
                    self.items[x.item as usize].id.as_str(),
                    &format_rating(x.rating),
                    &x.timestamp.to_string(),
                ])
                .map_err(DataError::csv(tmp))?;
            }
            w.flush().map_err(|e| DataError::io(&path, e))?;
            Ok(())
        })
    }
}

/// Read an `items.csv` (the dataset's, or an artifact's copy): items in file
/// order and an ID → index map.
pub fn read_items(path: &Path) -> Result<(Vec<Item>, HashMap<String, u32>), DataError> {
    let rows = Rows::open(path)?;
    let (c_id, c_title) = (rows.column("item_id")?, rows.column("title")?);
    let (c_year, c_genres, c_desc) = (
        rows.optional("year"),
        rows.optional("genres"),
        rows.optional("description"),
    );
    let mut items = Vec::new();
    let mut item_index: HashMap<String, u32> = HashMap::new();
    rows.for_each(|path, line, rec| {
        let id = field(rec, c_id, "item_id", path, line)?.to_string();
        let title = field(rec, c_title, "title", path, line)?.to_string();
        let year = match c_year.map(|c| rec.get(c).unwrap_or("").trim()) {
            None | Some("") => None,
            Some(y) => Some(
                y.parse::<i32>()
                    .map_err(|_| DataError::row(path, line, format!("non-numeric `year` {y:?}")))?,
            ),
        };
        let genres = c_genres
            .map(|c| {
                rec.get(c)
                    .unwrap_or("")
                    .split('|')
                    .map(str::trim)
                    .filter(|g| !g.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default();
        let description = c_desc
            .map(|c| rec.get(c).unwrap_or("").trim().to_string())
            .unwrap_or_default();
        if item_index.insert(id.clone(), items.len() as u32).is_some() {
            return Err(DataError::row(
                path,
                line,
                format!("duplicate item_id {id:?}"),
            ));
        }
        items.push(Item {
            id,
            title,
            year,
            genres,
            description,
        });
        Ok(())
    })?;
    Ok((items, item_index))
}

fn format_rating(r: f32) -> String {
    if r.fract() == 0.0 {
        format!("{}", r as i64)
    } else {
        format!("{r}")
    }
}
