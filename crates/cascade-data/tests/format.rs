//! Parsers on good and bad files: every bad row names its file and line.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::path::Path;

use cascade_data::{DataError, Dataset};

fn write(dir: &Path, name: &str, body: &str) {
    std::fs::write(dir.join(name), body).unwrap();
}

fn good(dir: &Path) {
    write(
        dir,
        "items.csv",
        "item_id,title,year,genres\nm1,Alpha,1995,Comedy|Drama\nm2,\"Beta, The\",,Horror\n",
    );
    write(
        dir,
        "users.csv",
        "user_id,age_group,gender\nalice,18-24,F\nbob,,M\n",
    );
    write(
        dir,
        "interactions.csv",
        "user_id,item_id,rating,timestamp\nalice,m1,4,100\nbob,m2,2.5,50\ncarol,m1,5,7\n",
    );
}

fn err_of(dir: &Path) -> String {
    match Dataset::load(dir) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn reads_a_good_dataset() {
    let d = tempfile::tempdir().unwrap();
    good(d.path());
    let ds = Dataset::load(d.path()).unwrap();
    assert_eq!(ds.items.len(), 2);
    assert_eq!(ds.items[1].title, "Beta, The");
    assert_eq!(ds.items[1].year, None);
    assert_eq!(ds.items[0].genres, vec!["Comedy", "Drama"]);
    assert_eq!(ds.user_feature_names, vec!["age_group", "gender"]);
    // carol is only in interactions: she becomes a user with empty features.
    assert_eq!(ds.users.len(), 3);
    assert_eq!(ds.users[2].id, "carol");
    assert_eq!(ds.users[2].features, vec!["", ""]);
    assert_eq!(ds.interactions.len(), 3);
    assert_eq!(ds.interactions[1].rating, 2.5);
    assert_eq!(
        ds.items[0].content_text(),
        "Alpha (1995). Genres: Comedy, Drama"
    );
    assert_eq!(ds.checksum.len(), 64);
}

#[test]
fn round_trips_through_write() {
    let d = tempfile::tempdir().unwrap();
    good(d.path());
    let ds = Dataset::load(d.path()).unwrap();
    let out = d.path().join("copy");
    ds.write(&out).unwrap();
    let back = Dataset::load(&out).unwrap();
    assert_eq!(back.items, ds.items);
    assert_eq!(back.users, ds.users);
    assert_eq!(back.interactions, ds.interactions);
}

#[test]
fn non_numeric_rating_names_file_and_line() {
    let d = tempfile::tempdir().unwrap();
    good(d.path());
    write(
        d.path(),
        "interactions.csv",
        "user_id,item_id,rating\nalice,m1,4\nbob,m2,five\n",
    );
    let e = err_of(d.path());
    assert!(
        e.contains("interactions.csv:3:") && e.contains("non-numeric `rating`"),
        "{e}"
    );
}

#[test]
fn unknown_item_names_file_and_line() {
    let d = tempfile::tempdir().unwrap();
    good(d.path());
    write(
        d.path(),
        "interactions.csv",
        "user_id,item_id,rating\nalice,m1,4\nalice,m1,4\nbob,zzz,3\n",
    );
    let e = err_of(d.path());
    assert!(
        e.contains("interactions.csv:4:") && e.contains("unknown item_id \"zzz\""),
        "{e}"
    );
}

#[test]
fn missing_column_and_short_row() {
    let d = tempfile::tempdir().unwrap();
    good(d.path());
    write(d.path(), "interactions.csv", "user_id,item_id\nalice,m1\n");
    let e = err_of(d.path());
    assert!(
        e.contains("interactions.csv:1:") && e.contains("missing required column `rating`"),
        "{e}"
    );

    write(
        d.path(),
        "interactions.csv",
        "user_id,item_id,rating\nalice,m1,4\nbob,m2\n",
    );
    let e = err_of(d.path());
    assert!(
        e.contains("interactions.csv:3:") && e.contains("expected 3 columns"),
        "{e}"
    );

    write(d.path(), "items.csv", "item_id,title\nm1,\n");
    let e = err_of(d.path());
    assert!(
        e.contains("items.csv:2:") && e.contains("empty `title`"),
        "{e}"
    );
}

#[test]
fn empty_files_are_errors() {
    let d = tempfile::tempdir().unwrap();
    good(d.path());
    write(d.path(), "interactions.csv", "");
    let e = err_of(d.path());
    assert!(
        e.contains("interactions.csv:1:") && e.contains("empty file"),
        "{e}"
    );
    write(d.path(), "interactions.csv", "user_id,item_id,rating\n");
    let e = err_of(d.path());
    assert!(
        e.contains("interactions.csv:2:") && e.contains("no data rows"),
        "{e}"
    );
}

#[test]
fn missing_items_file() {
    let d = tempfile::tempdir().unwrap();
    write(
        d.path(),
        "interactions.csv",
        "user_id,item_id,rating\nalice,m1,4\n",
    );
    assert!(
        matches!(Dataset::load(d.path()), Err(DataError::Missing(p)) if p.ends_with("items.csv"))
    );
}

#[test]
fn failed_atomic_write_leaves_nothing_behind() {
    let d = tempfile::tempdir().unwrap();
    let dest = d.path().join("out");
    std::fs::create_dir(&dest).unwrap();
    std::fs::write(dest.join("keep.txt"), "old").unwrap();
    let r: Result<(), DataError> = cascade_data::atomic_dir(&dest, |tmp| {
        std::fs::write(tmp.join("half.txt"), "partial").unwrap();
        Err(DataError::Missing(tmp.join("boom")))
    });
    assert!(r.is_err());
    // the old content is intact and no temporary directory remains
    assert_eq!(
        std::fs::read_to_string(dest.join("keep.txt")).unwrap(),
        "old"
    );
    let names: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("out")]);
}
