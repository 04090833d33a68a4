//! MovieLens conversion from both sources' layouts, on small archives built here
//! (the real archives are exercised by `cascade fetch`; GroupLens is often
//! unreachable from build hosts, so its converter is tested on its format).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::io::Write;
use std::path::Path;

use cascade_data::fetch::{from_grouplens_zip, from_recbole_wheel};

fn zip_with(path: &Path, files: &[(&str, &[u8])]) {
    let mut w = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    for (name, body) in files {
        w.start_file(*name, zip::write::SimpleFileOptions::default())
            .unwrap();
        w.write_all(body).unwrap();
    }
    w.finish().unwrap();
}

#[test]
fn grouplens_layout() {
    let d = tempfile::tempdir().unwrap();
    let zip = d.path().join("ml-100k.zip");
    // u.item is Latin-1: 0xE9 is 'é'. 19 genre flags after the URL.
    let mut item =
        b"1|Toy Story (1995)|01-Jan-1995||http://x|0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0\n"
            .to_vec();
    item.extend_from_slice(b"2|Cit\xe9 des enfants perdus, La (1995)|01-Jan-1995||http://y|0|0|0|0|0|0|0|0|1|0|0|0|0|0|0|1|0|0|0\n");
    let user = b"1|24|M|technician|85711\n2|53|F|other|94043\n";
    let data = b"1\t1\t5\t874965758\n2\t2\t3\t876893171\n1\t2\t4\t878542960\n";
    zip_with(
        &zip,
        &[
            ("ml-100k/u.item", &item),
            ("ml-100k/u.user", user),
            ("ml-100k/u.data", data),
        ],
    );
    let ds = from_grouplens_zip(&zip).unwrap();
    assert_eq!(ds.items.len(), 2);
    assert_eq!(ds.items[0].title, "Toy Story");
    assert_eq!(ds.items[0].year, Some(1995));
    assert_eq!(
        ds.items[0].genres,
        vec!["Animation", "Children's", "Comedy"]
    );
    assert_eq!(ds.items[1].title, "Cité des enfants perdus, La");
    assert_eq!(ds.items[1].genres, vec!["Drama", "Sci-Fi"]);
    assert_eq!(ds.users[0].features, vec!["18-24", "M", "technician", "8"]);
    assert_eq!(ds.users[1].features[0], "45-54");
    assert_eq!(ds.interactions.len(), 3);
    assert_eq!(
        (
            ds.interactions[2].user,
            ds.interactions[2].item,
            ds.interactions[2].rating
        ),
        (0, 1, 4.0)
    );
}

#[test]
fn recbole_layout_matches_grouplens_conversion() {
    let d = tempfile::tempdir().unwrap();
    let whl = d.path().join("recbole.whl");
    let dir = "recbole/dataset_example/ml-100k";
    let inter = b"user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t1\t5\t874965758\n2\t2\t3\t876893171\n1\t2\t4\t878542960\n";
    let item = b"item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n1\tToy Story\t1995\tAnimation Children's Comedy\n2\tCit\xc3\xa9 des enfants perdus, La\t1995\tDrama Sci-Fi\n";
    let user = b"user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n1\t24\tM\ttechnician\t85711\n2\t53\tF\tother\t94043\n";
    zip_with(
        &whl,
        &[
            (&format!("{dir}/ml-100k.inter"), inter),
            (&format!("{dir}/ml-100k.item"), item),
            (&format!("{dir}/ml-100k.user"), user),
        ],
    );
    let ds = from_recbole_wheel(&whl).unwrap();
    assert_eq!(ds.items[1].title, "Cité des enfants perdus, La");
    assert_eq!(
        ds.items[0].genres,
        vec!["Animation", "Children's", "Comedy"]
    );
    assert_eq!(ds.users[1].features, vec!["45-54", "F", "other", "9"]);
    assert_eq!(ds.interactions.len(), 3);
    assert_eq!(ds.interactions[1].timestamp, 876893171);
}

#[test]
fn truncated_rating_row_is_an_error() {
    let d = tempfile::tempdir().unwrap();
    let whl = d.path().join("recbole.whl");
    let dir = "recbole/dataset_example/ml-100k";
    zip_with(
        &whl,
        &[
            (&format!("{dir}/ml-100k.inter"), b"user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t1\n".as_slice()),
            (&format!("{dir}/ml-100k.item"), b"item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n1\tA\t1995\tDrama\n".as_slice()),
            (&format!("{dir}/ml-100k.user"), b"user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n1\t24\tM\tx\t1\n".as_slice()),
        ],
    );
    let e = from_recbole_wheel(&whl).expect_err("must fail").to_string();
    assert!(e.contains("ml-100k.inter:2:"), "{e}");
}
