//! `cargo xtask fuzz`: the coverage-guided fuzz targets of `fuzz/`
//! (cargo-fuzz and libFuzzer), one after another.
//!
//! cargo-fuzz needs nightly compiler flags (`-Zsanitizer=address`); the
//! toolchain here is stable, so it runs with `RUSTC_BOOTSTRAP=1`, which
//! lets stable rustc accept them. Each run reads the checked-in seeds in
//! `fuzz/corpus/TARGET/` and grows its own corpus in
//! `target/fuzz/corpus/TARGET/` (kept between runs, never checked in);
//! crashes land in `target/fuzz/artifacts/TARGET/`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use crate::cli::FuzzOpts;
use crate::util::{self, describe};
use crate::{Context, Error, Result};

pub const FUZZ_DIR: &str = "fuzz";
const TARGET_DIR: &str = "target/fuzz";
/// Seconds per target when `--seconds` is not given.
pub const DEFAULT_SECONDS: u64 = 60;
/// The crate cargo-fuzz comes from, installed by `cargo xtask setup`.
pub const CARGO_FUZZ: &str = "cargo-fuzz";

/// The targets: the entry points in `fuzz/fuzz_targets/`, sorted.
pub fn targets(fuzz_dir: &Path) -> Result<Vec<String>> {
    let dir = fuzz_dir.join("fuzz_targets");
    let entries = fs::read_dir(&dir).context(|| format!("cannot list {}", dir.display()))?;
    let mut names = Vec::new();
    for entry in entries {
        let path = entry
            .context(|| format!("cannot list {}", dir.display()))?
            .path();
        if path.extension().is_some_and(|e| e == "rs") {
            if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
                names.push(stem.to_string());
            }
        }
    }
    names.sort();
    Ok(names)
}

/// Which of `all` to run: the one named, or every one.
pub fn select(all: &[String], wanted: Option<&str>) -> Result<Vec<String>> {
    match wanted {
        None => Ok(all.to_vec()),
        Some(name) if all.iter().any(|t| t == name) => Ok(vec![name.to_string()]),
        Some(name) => Err(Error::Usage(format!(
            "unknown fuzz target `{name}` (one of: {})",
            all.join(", ")
        ))),
    }
}

/// libFuzzer's summary line: `Done N runs in S second(s)`.
pub fn runs_done(output: &str) -> Option<u64> {
    output
        .lines()
        .rev()
        .find_map(|line| line.strip_prefix("Done ")?.split(' ').next()?.parse().ok())
}

/// The last coverage figure libFuzzer printed (`cov: N`).
pub fn coverage(output: &str) -> Option<u64> {
    output.lines().rev().find_map(|line| {
        let rest = line.split_once("cov: ")?.1;
        rest.split(' ').next()?.parse().ok()
    })
}

fn cargo_fuzz(fuzz_dir: &Path) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(fuzz_dir)
        .env("RUSTC_BOOTSTRAP", "1")
        .env_remove("RUSTFLAGS")
        .arg("fuzz");
    cmd
}

pub fn run(opts: &FuzzOpts) -> Result<ExitCode> {
    let fuzz_dir = PathBuf::from(FUZZ_DIR);
    let selected = select(&targets(&fuzz_dir)?, opts.target.as_deref())?;
    if util::which("cargo-fuzz").is_none() {
        return Err(Error::Other(format!(
            "fuzz: cargo-fuzz not found; run `cargo xtask setup` (cargo install {CARGO_FUZZ})"
        )));
    }
    // Paths as cargo-fuzz sees them, from inside fuzz/.
    let target_dir = Path::new("..").join(TARGET_DIR);
    let mut build = cargo_fuzz(&fuzz_dir);
    build.args(["build", "--features", "libfuzzer", "--target-dir"]);
    build.arg(&target_dir);
    if let [one] = selected.as_slice() {
        build.arg(one);
    }
    println!("fuzz: {}", describe(&build));
    util::run(&mut build)?;

    let mut failed = Vec::new();
    let mut results = Vec::new();
    for name in &selected {
        let corpus = Path::new(TARGET_DIR).join("corpus").join(name);
        let artifacts = Path::new(TARGET_DIR).join("artifacts").join(name);
        for dir in [&corpus, &artifacts] {
            fs::create_dir_all(dir).context(|| format!("cannot create {}", dir.display()))?;
        }
        let mut cmd = cargo_fuzz(&fuzz_dir);
        cmd.args(["run", "--features", "libfuzzer", "--target-dir"])
            .arg(&target_dir)
            .arg(name)
            .arg(Path::new("..").join(&corpus))
            .arg(Path::new("corpus").join(name))
            .arg("--")
            .arg(format!("-max_total_time={}", opts.seconds))
            .arg(format!(
                "-artifact_prefix={}/",
                Path::new("..").join(&artifacts).display()
            ))
            .arg("-print_final_stats=1");
        println!("fuzz: {}", describe(&cmd));
        let start = Instant::now();
        let out = util::output(&mut cmd)?;
        let text = String::from_utf8_lossy(&out.stderr);
        let runs = runs_done(&text).map_or("?".into(), |n| n.to_string());
        let cov = coverage(&text).map_or("?".into(), |n| n.to_string());
        let time = util::secs(start.elapsed());
        if out.status.success() {
            println!("PASS fuzz {name} {time} ({runs} runs, coverage {cov})");
        } else {
            println!(
                "FAIL fuzz {name} {time} ({}); input in {}/",
                out.status,
                artifacts.display()
            );
            for line in util::tail(&text, 30) {
                println!("    {line}");
            }
            failed.push(name.clone());
        }
        results.push((name.clone(), runs, cov));
    }
    println!("\n{:<16} {:>12} {:>9}", "target", "runs", "coverage");
    for (name, runs, cov) in &results {
        println!("{name:<16} {runs:>12} {cov:>9}");
    }
    println!(
        "{} passed, {} failed",
        selected.len() - failed.len(),
        failed.len()
    );
    Ok(if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fuzz_target_has_a_seed() {
        let fuzz_dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(FUZZ_DIR);
        let names = targets(&fuzz_dir).unwrap();
        assert!(names.len() >= 20, "{names:?}");
        for name in &names {
            let seeds = fuzz_dir.join("corpus").join(name);
            assert!(fs::read_dir(&seeds).unwrap().next().is_some(), "{name}");
        }
    }

    #[test]
    fn selects_targets() {
        let all = vec!["pic".to_string(), "uart".to_string()];
        assert_eq!(select(&all, None).unwrap(), all);
        assert_eq!(select(&all, Some("uart")).unwrap(), ["uart"]);
        assert!(select(&all, Some("floppy")).is_err());
    }

    #[test]
    fn reads_libfuzzer_figures() {
        let out = "\
#3\tINITED cov: 207 ft: 319 corp: 2/2304b exec/s: 0 rss: 40Mb
#243622\tDONE   cov: 260 ft: 1204 corp: 90/60Kb lim: 4096 exec/s: 11601 rss: 60Mb
Done 243622 runs in 21 second(s)
";
        assert_eq!(runs_done(out), Some(243_622));
        assert_eq!(coverage(out), Some(260));
        assert_eq!(runs_done("no summary"), None);
    }
}
