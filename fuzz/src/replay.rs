//! Every target over every file of its corpus folder, without libFuzzer:
//! the checked-in seeds and every input that once crashed a target
//! replay on each `cargo test`.

use std::fs;
use std::path::{Path, PathBuf};

use crate::TARGETS;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// The files of `corpus/NAME/`, sorted.
fn corpus(name: &str) -> Vec<PathBuf> {
    let dir = root().join("corpus").join(name);
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn corpus_replays() {
    let mut total = 0;
    for &(name, run) in TARGETS {
        let files = corpus(name);
        assert!(!files.is_empty(), "corpus/{name} has no seed");
        for file in &files {
            let data = fs::read(file).expect("a corpus file");
            let outcome = std::panic::catch_unwind(|| run(&data));
            assert!(outcome.is_ok(), "{name}: {} panics", file.display());
        }
        total += files.len();
    }
    println!("replayed {total} inputs on {} targets", TARGETS.len());
}

#[test]
fn every_entry_point_is_listed() {
    let mut entry_points: Vec<String> = fs::read_dir(root().join("fuzz_targets"))
        .expect("fuzz_targets/")
        .map(|entry| entry.expect("a directory entry").path())
        .filter_map(|path| Some(path.file_stem()?.to_str()?.to_string()))
        .collect();
    entry_points.sort();
    let mut listed: Vec<String> = TARGETS.iter().map(|(n, _)| n.to_string()).collect();
    listed.sort();
    assert_eq!(entry_points, listed);
    let manifest = fs::read_to_string(root().join("Cargo.toml")).expect("Cargo.toml");
    for name in &listed {
        assert!(
            manifest.contains(&format!("name = \"{name}\"")),
            "{name} has no [[bin]] in Cargo.toml"
        );
    }
}
