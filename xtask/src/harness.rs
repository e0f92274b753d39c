//! `cargo xtask test`: host unit tests, then the system tests, one summary.

use std::process::ExitCode;
use std::time::Instant;

use crate::build;
use crate::cli::TestOpts;
use crate::emu::Emulator;
use crate::image;
use crate::setup;
use crate::systest;
use crate::util::{self, describe};
use crate::Result;

/// A `cargo test` invocation on the host; each counts as one test.
struct HostSuite {
    name: &'static str,
    args: &'static [&'static str],
}

/// Crates whose logic is tested on the host.
const HOST_SUITES: &[HostSuite] = &[
    HostSuite {
        name: "moat-abi moat-kernel (lib)",
        args: &["-p", "moat-abi", "-p", "moat-kernel", "--lib"],
    },
    HostSuite {
        name: "moat-user moat-roottask (lib)",
        args: &["-p", "moat-user", "-p", "moat-roottask", "--lib"],
    },
    HostSuite {
        name: "moat-component-common",
        args: &["-p", "moat-component-common"],
    },
    HostSuite {
        name: "moat-testvm moat-testvmm (lib)",
        args: &["-p", "moat-testvm", "-p", "moat-testvmm", "--lib"],
    },
    HostSuite {
        name: "moat-vdev moat-vmm (lib) moat-firmware",
        args: &[
            "-p",
            "moat-vdev",
            "-p",
            "moat-vmm",
            "--lib",
            "-p",
            "moat-firmware",
        ],
    },
    HostSuite {
        name: "moat-guest-tools",
        args: &["-p", "moat-guest-tools"],
    },
    HostSuite {
        name: "xtask",
        args: &["-p", "xtask"],
    },
    // Every fuzz target over its corpus (fuzz/corpus/), without libFuzzer.
    HostSuite {
        name: "moat-fuzz corpus replay",
        args: &["-p", "moat-fuzz", "--manifest-path", "fuzz/Cargo.toml"],
    },
];

/// Output lines shown when a host suite fails.
const HOST_FAILURE_TAIL: usize = 40;

#[derive(Default)]
struct Tally {
    passed: usize,
    failed: usize,
}

impl Tally {
    fn count(&mut self, ok: bool) {
        if ok {
            self.passed += 1;
        } else {
            self.failed += 1;
        }
    }
}

pub fn run(opts: &TestOpts) -> Result<ExitCode> {
    let start = Instant::now();
    // Reject a bad filter before spending minutes on anything else.
    let tests = systest::select(opts.filter.as_deref())?;
    setup::run()?;
    let mut tally = Tally::default();

    if opts.host {
        for suite in HOST_SUITES {
            tally.count(host_suite(suite)?);
        }
    }

    let emus: Vec<Emulator> = match opts.emu {
        Some(emu) => vec![emu],
        None => Emulator::ALL.to_vec(),
    };
    match build::build_all().and_then(|a| image::assemble(&a).map(|_| a)) {
        Err(e) => {
            println!("FAIL build: {e}");
            println!(
                "     ({} system test runs not started)",
                tests.len() * emus.len()
            );
            tally.count(false);
        }
        Ok(artifacts) => {
            println!(
                "system tests: {} on {} (logs in {}/)",
                tests.iter().map(|t| t.name).collect::<Vec<_>>().join(", "),
                emus.iter().map(|e| e.name()).collect::<Vec<_>>().join(", "),
                systest::SYSTEST_DIR
            );
            let results = systest::run_all(&tests, &emus, &artifacts)?;
            for r in &results {
                tally.count(r.passed);
                for (passed, _) in &r.parts {
                    tally.count(*passed);
                }
            }
            for r in results.iter().filter(|r| !r.passed) {
                println!(
                    "\n--- {} [{}]: last lines of {}",
                    r.test,
                    r.emu.name(),
                    r.serial.display()
                );
                for line in r.serial_tail() {
                    println!("    {line}");
                }
            }
        }
    }

    println!("\ntotal wall time {}", util::secs(start.elapsed()));
    println!("{} passed, {} failed", tally.passed, tally.failed);
    Ok(if tally.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Runs one host suite with its output captured; prints one line, and the
/// end of the output when it fails.
fn host_suite(suite: &HostSuite) -> Result<bool> {
    let mut cmd = build::host_cargo();
    cmd.arg("test").args(suite.args);
    println!("host: {}", describe(&cmd));
    let start = Instant::now();
    let out = util::output(&mut cmd)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let counts = test_counts(&stdout);
    let ok = out.status.success();
    let time = util::secs(start.elapsed());
    let detail = match counts {
        Some((p, f)) => format!("{p} passed, {f} failed"),
        None => "no test results".to_string(),
    };
    if ok {
        println!("PASS host {} {time} ({detail})", suite.name);
    } else {
        println!("FAIL host {} {time} ({detail}, {})", suite.name, out.status);
        for line in failure_excerpt(&stdout, &stderr) {
            println!("    {line}");
        }
    }
    Ok(ok)
}

/// What to show of a failed `cargo test`: the failure reports without
/// backtrace frames when tests ran, else the end of the compiler's output.
fn failure_excerpt<'a>(stdout: &'a str, stderr: &'a str) -> Vec<&'a str> {
    let Some(start) = stdout.find("\nfailures:\n") else {
        return util::tail(stderr, HOST_FAILURE_TAIL);
    };
    let mut lines = Vec::new();
    let mut in_backtrace = false;
    for line in stdout[start + 1..].lines() {
        let t = line.trim_start();
        if t == "stack backtrace:" {
            in_backtrace = true;
            continue;
        }
        let frame = t.starts_with("at ")
            || t.split_once(": ")
                .is_some_and(|(n, _)| n.parse::<u32>().is_ok())
            || t.starts_with("note: Some details are omitted");
        if in_backtrace && frame {
            continue;
        }
        in_backtrace = false;
        if !t.starts_with("test result:") {
            lines.push(line);
        }
    }
    let keep = lines.len().saturating_sub(HOST_FAILURE_TAIL);
    lines.split_off(keep)
}

/// Sums the `test result:` lines of `cargo test` output.
fn test_counts(output: &str) -> Option<(usize, usize)> {
    let mut total = None;
    for line in output.lines() {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            continue;
        };
        let number = |label: &str| {
            rest.split(';')
                .find_map(|part| part.trim().strip_suffix(label))
                .and_then(|n| n.rsplit(' ').next()?.parse::<usize>().ok())
                .unwrap_or(0)
        };
        let (p, f) = total.unwrap_or((0, 0));
        total = Some((p + number(" passed"), f + number(" failed")));
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_cargo_test_results() {
        let out = "\
running 3 tests
test result: ok. 3 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s
test result: FAILED. 5 passed; 2 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s
";
        assert_eq!(test_counts(out), Some((8, 2)));
        assert_eq!(test_counts("error[E0425]: cannot find value"), None);
    }

    #[test]
    fn failure_excerpt_drops_backtraces() {
        let stdout = "\
running 2 tests
test a ... ok
test b ... FAILED

failures:

---- b stdout ----
thread 'b' panicked at src/x.rs:1:1:
boom
stack backtrace:
   0: core::panicking::panic_fmt
             at /rustc/x/panicking.rs:80:14
note: Some details are omitted, run with `RUST_BACKTRACE=full`


failures:
    b

test result: FAILED. 1 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out
";
        let excerpt = failure_excerpt(stdout, "Running unittests");
        assert_eq!(
            excerpt,
            [
                "failures:",
                "",
                "---- b stdout ----",
                "thread 'b' panicked at src/x.rs:1:1:",
                "boom",
                "",
                "",
                "failures:",
                "    b",
                "",
            ]
        );
        assert_eq!(
            failure_excerpt("", "error: could not compile"),
            ["error: could not compile"]
        );
    }

    #[test]
    fn host_suites_name_their_packages() {
        for suite in HOST_SUITES {
            assert!(suite.args.contains(&"-p"), "{}", suite.name);
        }
    }
}
