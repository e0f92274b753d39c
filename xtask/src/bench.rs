//! `cargo xtask bench ipc`: the IPC round-trip benchmark.
//!
//! Boots `ping` in bench mode against `echo` on QEMU with `-icount
//! shift=0` and on Bochs with `clock: sync=none`. In both, the guest's TSC
//! advances exactly one per executed instruction, so `ping`'s TSC
//! differences are instruction counts: deterministic, and comparable
//! between runs and machines, unlike wall time in an emulator. Prints a
//! table and writes `target/bench/ipc.json` (docs/benchmarks.md).

use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::process::ExitCode;

use crate::cli::BenchOpts;
use crate::cli::Benchmark;
use crate::emu::Emulator;
use crate::systest::{self, SysTest, BENCH_EXITS, BENCH_IPC};
use crate::{build, image, setup, Context, Result};

pub const BENCH_DIR: &str = "target/bench";
/// Cases `ping` measures, in its output order.
pub const IPC_CASES: [&str; 3] = ["null", "words6", "words64"];
const UNIT: &str = "instructions";
const METHOD: &str = "median and minimum of ping->echo round trips (call + reply between \
two PDs), TSC read before and after each call; QEMU -icount shift=0 and Bochs \
clock: sync=none advance the TSC by one per instruction";

/// One `bench ipc <case> median=<n> min=<n> iterations=<n>` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpcResult {
    pub case: String,
    pub median: u64,
    pub min: u64,
    pub iterations: u64,
}

/// What one benchmark boots, which result lines it expects and how they
/// were measured.
pub struct Spec {
    pub name: &'static str,
    pub test: &'static SysTest,
    pub cases: &'static [&'static str],
    pub method: &'static str,
}

pub const EXITS_CASES: [&str; 3] = ["cpuid", "hypercall", "native"];
const EXITS_METHOD: &str = "median and minimum over 10,000 round trips after 100 warm-up ones: cpuid = a CPUID exit handled by the user-space VMM (TSC read by the VMM around vcpu_run), hypercall = the guest IPC hypercall to the native echo server handled by the kernel (TSC read by the guest around VMCALL/VMMCALL), native = the VMM calling the same echo portal; QEMU -icount shift=0 and Bochs clock: sync=none advance the TSC by one per instruction";

pub fn spec(benchmark: Benchmark) -> Spec {
    match benchmark {
        Benchmark::Ipc => Spec {
            name: "ipc",
            test: &BENCH_IPC,
            cases: &IPC_CASES,
            method: METHOD,
        },
        Benchmark::Exits => Spec {
            name: "exits",
            test: &BENCH_EXITS,
            cases: &EXITS_CASES,
            method: EXITS_METHOD,
        },
    }
}

/// Every well-formed `bench NAME <case> median=.. min=.. iterations=..`
/// line of a serial log.
pub fn parse(serial: &str, name: &str) -> Vec<IpcResult> {
    let prefix = format!("bench {name} ");
    serial
        .lines()
        .filter_map(|line| {
            let (_, rest) = line.split_once(prefix.as_str())?;
            let mut words = rest.split_whitespace();
            let case = words.next()?.to_string();
            let mut field = |key: &str| -> Option<u64> {
                let word = words.next()?;
                word.strip_prefix(key)?.strip_prefix('=')?.parse().ok()
            };
            Some(IpcResult {
                median: field("median")?,
                min: field("min")?,
                iterations: field("iterations")?,
                case,
            })
        })
        .collect()
}

pub fn run(opts: &BenchOpts) -> Result<ExitCode> {
    let spec = spec(opts.benchmark);
    let name = spec.name;
    setup::run()?;
    let artifacts = build::build_all()?;
    image::assemble(&artifacts)?;
    let emus: Vec<Emulator> = match opts.emu {
        Some(emu) => vec![emu],
        None => Emulator::ALL.to_vec(),
    };
    println!(
        "bench {name}: on {} (logs in {}/)",
        emus.iter().map(|e| e.name()).collect::<Vec<_>>().join(", "),
        systest::SYSTEST_DIR
    );
    let runs = systest::run_all(&[spec.test], &emus, &artifacts)?;
    let mut rows = Vec::new();
    let mut complete = true;
    for run in &runs {
        let serial = fs::read(&run.serial)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let results = parse(&serial, name);
        for &case in spec.cases {
            match results.iter().find(|r| r.case == case) {
                Some(r) => rows.push((run.emu, r.clone())),
                None => {
                    complete = false;
                    println!("bench {name}: no result for {case} on {}", run.emu.name());
                }
            }
        }
        if !run.passed {
            for line in run.serial_tail() {
                println!("    {line}");
            }
        }
    }
    print!("\n{}", table(&rows));
    println!(
        "unit: {UNIT} (the TSC counts one per instruction under QEMU -icount shift=0 \
         and Bochs clock: sync=none)"
    );
    let dir = Path::new(BENCH_DIR);
    fs::create_dir_all(dir).context(|| format!("cannot create {}", dir.display()))?;
    let json = dir.join(format!("{name}.json"));
    fs::write(&json, to_json_named(&rows, name, spec.method))
        .context(|| format!("cannot write {}", json.display()))?;
    println!("bench {name}: wrote {}", json.display());
    Ok(if complete && runs.iter().all(|r| r.passed) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub fn table(rows: &[(Emulator, IpcResult)]) -> String {
    let mut out = format!(
        "{:<10} {:<9} {:>10} {:>10}  unit\n",
        "case", "emulator", "median", "min"
    );
    for (emu, r) in rows {
        let _ = writeln!(
            out,
            "{:<10} {:<9} {:>10} {:>10}  {UNIT}",
            r.case,
            emu.name(),
            r.median,
            r.min
        );
    }
    out
}

fn json_string(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

pub fn to_json_named(rows: &[(Emulator, IpcResult)], name: &str, method: &str) -> String {
    let results: Vec<String> = rows
        .iter()
        .map(|(emu, r)| {
            format!(
                "    {{\"case\": {}, \"emulator\": {}, \"median\": {}, \"min\": {}, \"iterations\": {}}}",
                json_string(&r.case),
                json_string(emu.name()),
                r.median,
                r.min,
                r.iterations
            )
        })
        .collect();
    format!(
        "{{\n  \"benchmark\": {},\n  \"unit\": {},\n  \"method\": {},\n  \"results\": [\n{}\n  ]\n}}\n",
        json_string(name),
        json_string(UNIT),
        json_string(method),
        results.join(",\n")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bench_lines_anywhere_in_the_log() {
        let serial = "\
roottask: started 'ping'
ping: bench, 10000 round trips per case, in TSC ticks
bench ipc null median=812 min=790 iterations=10000
~~bench ipc words6 median=830 min=801 iterations=10000
bench ipc words64 median=x min=1 iterations=10000
bench ipc broken
";
        assert_eq!(
            parse(serial, "ipc"),
            [
                IpcResult {
                    case: "null".into(),
                    median: 812,
                    min: 790,
                    iterations: 10000
                },
                IpcResult {
                    case: "words6".into(),
                    median: 830,
                    min: 801,
                    iterations: 10000
                },
            ]
        );
    }

    fn rows() -> Vec<(Emulator, IpcResult)> {
        vec![(
            Emulator::Qemu,
            IpcResult {
                case: "null".into(),
                median: 812,
                min: 790,
                iterations: 10000,
            },
        )]
    }

    #[test]
    fn table_has_a_header_and_a_row_per_result() {
        let text = table(&rows());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("case") && lines[0].ends_with("unit"));
        assert_eq!(
            lines[1].split_whitespace().collect::<Vec<_>>(),
            ["null", "qemu", "812", "790", "instructions"]
        );
    }

    #[test]
    fn json_lists_results() {
        let json = to_json_named(&rows(), "ipc", METHOD);
        assert!(json.contains(
            "{\"case\": \"null\", \"emulator\": \"qemu\", \"median\": 812, \"min\": 790, \"iterations\": 10000}"
        ));
        assert!(json.contains("\"unit\": \"instructions\""));
        assert_eq!(json_string("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
        assert!(to_json_named(&[], "ipc", METHOD).contains("\"results\": [\n\n  ]"));
    }

    #[test]
    fn bench_test_counts_instructions_on_qemu() {
        assert_eq!(BENCH_IPC.qemu_args, ["-icount", "shift=0"]);
        for case in IPC_CASES {
            assert!(BENCH_IPC
                .expect
                .iter()
                .any(|e| e.text == format!("bench ipc {case} ")));
        }
    }
}
