//! `cargo xtask bench ipc`: the IPC round-trip benchmark.
//!
//! Boots `ping` in bench mode against `echo` on QEMU with `-icount
//! shift=0` and on Bochs with `clock: sync=none`. In both, the guest's TSC
//! advances exactly one per executed instruction, so `ping`'s TSC
//! differences are instruction counts: deterministic, and comparable
//! between runs and machines, unlike wall time in an emulator. Prints a
//! table and writes `target/bench/ipc.json` (docs/benchmarks.md).
//!
//! `cargo xtask bench linux` is of another kind: wall time and guest time
//! of whole Linux boots, under Moat against the emulator booting the same
//! guest itself (see [`run_linux`]).
//!
//! `cargo xtask bench` (or `bench all`) puts four round trips in one table:
//! native IPC (`bench ipc`'s boot) and, from one boot of the Linux guest
//! with `moat.bench=1`, the IPC hypercall, an AT command over the
//! virtio-console port through the VMM, and a pipe ping-pong between two
//! Linux processes; each in cycles (QEMU TCG) and in instructions (QEMU
//! `-icount`, Bochs). Writes `target/bench/all.json` and a chart,
//! `target/bench/bench.svg` (see [`run_all`]).

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use serde_json::{json, Value};

use crate::build::Artifacts;
use crate::cli::BenchOpts;
use crate::cli::Benchmark;
use crate::emu::{self, BochsFiles, Emulator, Exit};
use crate::linux::{self, SerialClock, INIT_START};
use crate::systest::{
    self, Content, Expect, Launch, LinuxFile, ModuleSpec, SysTest, BENCH_EXITS, BENCH_IPC,
};
use crate::{build, image, setup, Context, Error, Result};

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

/// What a benchmark measured in one boot; `None` for `linux`, which boots
/// Linux several times instead ([`run_linux`]), and for `all`, which boots
/// several systems ([`run_all`]).
pub fn spec(benchmark: Benchmark) -> Option<Spec> {
    Some(match benchmark {
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
        Benchmark::Linux | Benchmark::All | Benchmark::Smp | Benchmark::Io => return None,
    })
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
    let Some(spec) = spec(opts.benchmark) else {
        return match opts.benchmark {
            Benchmark::All => run_all(opts),
            Benchmark::Smp => run_smp(opts),
            Benchmark::Io => crate::iobench::run(opts),
            _ => run_linux(opts),
        };
    };
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

/// A benchmark's JSON file: pretty-printed, ending in a newline.
pub fn json_text(value: &Value) -> String {
    let mut text = serde_json::to_string_pretty(value).expect("a JSON value always serializes");
    text.push('\n');
    text
}

pub fn to_json_named(rows: &[(Emulator, IpcResult)], name: &str, method: &str) -> String {
    let results: Vec<Value> = rows
        .iter()
        .map(|(emu, r)| {
            json!({
                "case": r.case,
                "emulator": emu.name(),
                "median": r.median,
                "min": r.min,
                "iterations": r.iterations,
            })
        })
        .collect();
    json_text(&json!({
        "benchmark": name,
        "unit": UNIT,
        "method": method,
        "results": results,
    }))
}

// ------------------------------------------------------------------ bench smp

const SMP_METHOD: &str = "QEMU multi-threaded TCG without -icount (each CPU a host thread, \
the TSC following the host clock), one boot per row: throughput = one echo/ping pair per CPU \
on CPUs 0..N, each pair on its own CPU, 50,000 null calls each after 100 warm-up ones, all \
pairs at once; aggregate = all calls / (latest end - earliest start) by the TSC (the same on \
every CPU), ratio = aggregate / the 1-CPU aggregate of the same run; wakeup = an EC on CPU 0 \
stamps the TSC and ups a semaphore that an EC of the same PD on CPU 1 waits on, which reads \
the TSC when it runs (median and minimum of 2,000 after 100 warm-up ones; the waiter blocks \
before each up); parjob = the Linux test guest on 2 CPUs with 1 and with 2 vCPUs runs the same \
job, `stress --cpu 2 --mem 0` (two threads of checked arithmetic) for 20 s of guest time \
(kvm-clock, which follows the host clock here), speed-up = cpu rounds with 2 vCPUs / with 1. \
On a host with fewer cores than emulated CPUs the CPUs share them.";

/// The cpu rounds of a `MOAT-BENCH parjob: N vCPUs, stress: done, R cpu
/// rounds, ...` line, with N.
pub fn parse_parjob(serial: &str) -> Option<(u64, u64)> {
    complete_lines(serial).find_map(|line| {
        let (_, rest) = line.split_once("MOAT-BENCH parjob: ")?;
        let (vcpus, rest) = rest.split_once(" vCPUs, stress: done, ")?;
        let (rounds, _) = rest.split_once(" cpu rounds")?;
        Some((vcpus.trim().parse().ok()?, rounds.trim().parse().ok()?))
    })
}

/// One `bench smp pair cpu=C calls=N start=S end=E` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PairRun {
    pub cpu: u64,
    pub calls: u64,
    pub start: u64,
    pub end: u64,
}

/// A line's `key=value` words as numbers.
fn fields(line: &str, keys: &[&str]) -> Option<Vec<u64>> {
    keys.iter()
        .map(|key| {
            line.split_whitespace()
                .find_map(|word| word.strip_prefix(key)?.strip_prefix('='))
                .and_then(|value| value.parse().ok())
        })
        .collect()
}

pub fn parse_pairs(serial: &str) -> Vec<PairRun> {
    serial
        .lines()
        .filter_map(|line| line.split_once("bench smp pair ").map(|(_, rest)| rest))
        .filter_map(|rest| {
            let v = fields(rest, &["cpu", "calls", "start", "end"])?;
            Some(PairRun {
                cpu: v[0],
                calls: v[1],
                start: v[2],
                end: v[3],
            })
        })
        .collect()
}

/// Calls per TSC tick of the pairs together: all calls over the span from
/// the earliest start to the latest end.
pub fn aggregate(pairs: &[PairRun]) -> Option<f64> {
    let start = pairs.iter().map(|p| p.start).min()?;
    let end = pairs.iter().map(|p| p.end).max()?;
    let calls: u64 = pairs.iter().map(|p| p.calls).sum();
    (end > start).then(|| calls as f64 / (end - start) as f64)
}

/// The TSC rate the kernel measured (`lapic: ... tsc N MHz`), in Hz.
pub fn tsc_hz(serial: &str) -> Option<u64> {
    serial.lines().find_map(|line| {
        let (_, rest) = line.split_once(", tsc ")?;
        let mhz: u64 = rest.split_whitespace().next()?.parse().ok()?;
        Some(mhz * 1_000_000)
    })
}

pub fn run_smp(opts: &BenchOpts) -> Result<ExitCode> {
    if opts.emu == Some(Emulator::Bochs) {
        println!(
            "bench smp: QEMU only: Bochs runs its CPUs one after another in one host thread, \
             so it cannot show CPUs working at once"
        );
        return Ok(ExitCode::FAILURE);
    }
    setup::run()?;
    let artifacts = build::build_all()?;
    image::assemble(&artifacts)?;
    let tests: Vec<&SysTest> = systest::BENCH_SMP.iter().collect();
    println!("bench smp: on qemu (logs in {}/)", systest::SYSTEST_DIR);
    // One at a time: the boots must not share the host's cores.
    let mut runs = Vec::new();
    for test in &tests {
        runs.extend(systest::run_all(&[*test], &[Emulator::Qemu], &artifacts)?);
    }
    let serial_of = |name: &str| -> String {
        runs.iter()
            .find(|r| r.test == name)
            .and_then(|r| fs::read(&r.serial).ok())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    };
    let mut complete = runs.iter().all(|r| r.passed);
    let mut rows = Vec::new();
    let mut base = None;
    println!(
        "\n{:<14} {:>6} {:>16} {:>8}",
        "case", "pairs", "calls/s", "ratio"
    );
    for (cpus, name) in [(1u64, "bench_smp1"), (2, "bench_smp2"), (4, "bench_smp4")] {
        let serial = serial_of(name);
        let pairs = parse_pairs(&serial);
        let (Some(per_tick), Some(hz), true) = (
            aggregate(&pairs),
            tsc_hz(&serial),
            pairs.len() as u64 == cpus,
        ) else {
            println!("bench smp: no complete result for {cpus} CPU(s)");
            complete = false;
            continue;
        };
        let per_second = per_tick * hz as f64;
        let ratio = per_second / *base.get_or_insert(per_second);
        println!(
            "{:<14} {:>6} {:>16.0} {:>8.2}",
            format!("throughput{cpus}"),
            pairs.len(),
            per_second,
            ratio
        );
        rows.push(json!({
            "case": format!("throughput{cpus}"),
            "cpus": cpus,
            "calls_per_second": per_second.round(),
            "ratio_to_1_cpu": (ratio * 1000.0).round() / 1000.0,
            "pairs": pairs.iter().map(|p| json!({
                "cpu": p.cpu, "calls": p.calls, "start": p.start, "end": p.end,
            })).collect::<Vec<_>>(),
        }));
    }
    let serial = serial_of("bench_smp_wakeup");
    let wakeup = serial.lines().find_map(|line| {
        let (_, rest) = line.split_once("bench smp wakeup ")?;
        fields(rest, &["from", "to", "median", "min", "samples"])
    });
    match (wakeup, tsc_hz(&serial)) {
        (Some(v), Some(hz)) => {
            let us = |ticks: u64| ticks as f64 * 1e6 / hz as f64;
            println!(
                "wakeup cpu{}->cpu{}: median {} ticks ({:.1} us), min {} ticks ({:.1} us), {} samples",
                v[0], v[1], v[2], us(v[2]), v[3], us(v[3]), v[4]
            );
            rows.push(json!({
                "case": "wakeup",
                "from_cpu": v[0],
                "to_cpu": v[1],
                "median_ticks": v[2],
                "min_ticks": v[3],
                "median_us": (us(v[2]) * 10.0).round() / 10.0,
                "min_us": (us(v[3]) * 10.0).round() / 10.0,
                "samples": v[4],
                "tsc_hz": hz,
            }));
        }
        _ => {
            println!("bench smp: no wake-up result");
            complete = false;
        }
    }
    let parjob = |name: &str, vcpus: u64| parse_parjob(&serial_of(name)).filter(|p| p.0 == vcpus);
    match (parjob("bench_parjob1", 1), parjob("bench_parjob2", 2)) {
        (Some((_, one)), Some((_, two))) if one > 0 => {
            let speedup = two as f64 / one as f64;
            println!(
                "parjob: 2 threads for 20 s, {one} cpu rounds on 1 vCPU, {two} on 2 vCPUs: speed-up {speedup:.2}"
            );
            rows.push(json!({
                "case": "parjob",
                "seconds": 20,
                "rounds_1_vcpu": one,
                "rounds_2_vcpus": two,
                "speedup": (speedup * 1000.0).round() / 1000.0,
            }));
        }
        _ => {
            println!("bench smp: no complete Linux parallel-job result");
            complete = false;
        }
    }
    for run in runs.iter().filter(|r| !r.passed) {
        for line in run.serial_tail() {
            println!("    {line}");
        }
    }
    let dir = Path::new(BENCH_DIR);
    fs::create_dir_all(dir).context(|| format!("cannot create {}", dir.display()))?;
    let json_path = dir.join("smp.json");
    fs::write(
        &json_path,
        json_text(&json!({
            "benchmark": "smp",
            "emulator": "qemu",
            "method": SMP_METHOD,
            "results": rows,
        })),
    )
    .context(|| format!("cannot write {}", json_path.display()))?;
    println!("bench smp: wrote {}", json_path.display());
    Ok(if complete {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

// ---------------------------------------------------------------- bench linux

const LINUX: &str = "linux";
/// The system test whose image the Moat boot is.
const LINUX_TEST: &str = "linux";
/// What the VMM prints at power-off, after its exit counts.
const GUEST_STOPPED: &str = "vmm: guest stopped";
/// The root task's line once the guest's VMM is gone (finished, exited or
/// faulted).
const LINUX_COMPONENT_ENDED: &str = "roottask: component 'linux' ";
const GUEST_POWER_OFF: &str = "vmm: guest stopped: power-off";
const VMM_EXITS: &str = "vmm: exits ";
const LINUX_QEMU_TIMEOUT: Duration = Duration::from_secs(120);
const LINUX_BOCHS_TIMEOUT: Duration = Duration::from_secs(600);
const LINUX_UNIT: &str = "seconds";
const LINUX_METHOD: &str = "one emulator at a time, direct and Moat boots alternating; \
direct = the emulator boots bzImage and initramfs itself (QEMU -kernel, Bochs through GRUB) \
with the Moat guest's kernel arguments and RAM, no virtio devices; moat = the `linux` system \
test's image (QEMU TCG with SVM, Bochs with VMX); wall = host time from the emulator's start \
to the first `MOAT-INIT start` on its serial log (polled every 50 ms); uptime = the guest's \
/proc/uptime in that line (under Moat kvm-clock from the TSC; in Bochs, clock: sync=none makes \
the TSC count instructions, so uptime there is deterministic; but Linux booted directly by \
Bochs takes the TSC rate from CPUID, 3500 MHz, while Moat measures 50 MHz against the PIT, so \
the direct Bochs uptime is on another scale); median = the lower median over the runs; ratio = moat / direct of the medians and of the minimums; exits = the VMM's \
`vmm: exits` line at power-off (both guest boots, the disk test reboots once, and every check) \
of the run with the median total";

/// Median (the lower one for an even count: a value that occurred) and
/// minimum of a set of samples.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
}

/// `None` for no (finite) samples.
pub fn summarize(samples: impl IntoIterator<Item = f64>) -> Option<Summary> {
    let mut sorted: Vec<f64> = samples.into_iter().filter(|x| x.is_finite()).collect();
    sorted.sort_by(f64::total_cmp);
    Some(Summary {
        median: *sorted.get(sorted.len().checked_sub(1)? / 2)?,
        min: *sorted.first()?,
    })
}

impl Summary {
    /// `self / base`, medians and minimums each; `None` unless the base is
    /// positive.
    pub fn ratio(self, base: Summary) -> Option<Summary> {
        (base.median > 0.0 && base.min > 0.0).then(|| Summary {
            median: self.median / base.median,
            min: self.min / base.min,
        })
    }
}

/// The VMM's exit counts: `vmm: exits <total>: <reason> <count> ...`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exits {
    pub total: u64,
    /// In the order printed.
    pub by_reason: Vec<(String, u64)>,
}

/// The lines of `serial` that are complete (a line still being written
/// may end mid-number), without their line ending.
fn complete_lines(serial: &str) -> impl Iterator<Item = &str> {
    serial
        .split_inclusive('\n')
        .filter_map(|l| l.strip_suffix('\n'))
        .map(|l| l.trim_end_matches('\r'))
}

/// The `uptime=` of the first complete `MOAT-INIT start` line (the first
/// boot's; under Moat the guest boots twice).
pub fn init_uptime(serial: &str) -> Option<f64> {
    let line = complete_lines(serial).find(|l| l.contains(INIT_START))?;
    let (_, rest) = line.split_once(INIT_START)?;
    let uptime: f64 = rest
        .split_whitespace()
        .next()?
        .strip_prefix("uptime=")?
        .parse()
        .ok()?;
    (uptime.is_finite() && uptime >= 0.0).then_some(uptime)
}

/// The last complete, well-formed `vmm: exits` line.
pub fn parse_exits(serial: &str) -> Option<Exits> {
    complete_lines(serial)
        .filter_map(|line| line.split_once(VMM_EXITS).map(|(_, rest)| rest))
        .filter_map(|rest| {
            let (total, reasons) = rest.split_once(':')?;
            let words: Vec<&str> = reasons.split_whitespace().collect();
            if words.is_empty() || !words.len().is_multiple_of(2) {
                return None;
            }
            let by_reason = words
                .chunks_exact(2)
                .map(|pair| {
                    let named = pair[0].chars().all(|c| c.is_ascii_alphabetic());
                    Some((named.then(|| pair[0].to_string())?, pair[1].parse().ok()?))
                })
                .collect::<Option<Vec<_>>>()?;
            Some(Exits {
                total: total.trim().parse().ok()?,
                by_reason,
            })
        })
        .last()
}

/// What one boot showed; `None` where it did not get that far.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BootRun {
    /// Host seconds from the emulator's start to `MOAT-INIT start`.
    pub wall: Option<f64>,
    /// The guest's uptime in that line, in seconds.
    pub uptime: Option<f64>,
    /// The VMM's counts (Moat boots only).
    pub exits: Option<Exits>,
}

/// Wall and guest time of a set of boots.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Figures {
    pub wall: Option<Summary>,
    pub uptime: Option<Summary>,
}

impl Figures {
    pub fn of(runs: &[BootRun]) -> Figures {
        Figures {
            wall: summarize(runs.iter().filter_map(|r| r.wall)),
            uptime: summarize(runs.iter().filter_map(|r| r.uptime)),
        }
    }

    /// `self / base`, figure by figure.
    pub fn ratio(self, base: Figures) -> Figures {
        let ratio = |a: Option<Summary>, b: Option<Summary>| a?.ratio(b?);
        Figures {
            wall: ratio(self.wall, base.wall),
            uptime: ratio(self.uptime, base.uptime),
        }
    }
}

/// Both boots of one emulator, every run.
pub struct LinuxResult {
    pub emu: Emulator,
    pub direct: Vec<BootRun>,
    pub moat: Vec<BootRun>,
}

impl LinuxResult {
    /// The exits of the run with the (lower) median total.
    pub fn median_exits(&self) -> Option<&Exits> {
        let mut all: Vec<&Exits> = self.moat.iter().filter_map(|r| r.exits.as_ref()).collect();
        all.sort_by_key(|e| e.total);
        all.get(all.len().checked_sub(1)? / 2).copied()
    }
}

/// The Moat boot: the `linux` system test, under its own name so that its
/// ISO and logs do not collide with a test run's.
fn moat_linux_test() -> Result<SysTest> {
    let test = systest::TESTS
        .iter()
        .find(|t| t.name == LINUX_TEST)
        .ok_or_else(|| Error::Other(format!("no system test named `{LINUX_TEST}`")))?;
    Ok(SysTest {
        name: "bench_linux",
        ..*test
    })
}

/// The guest kernel's arguments in `test`: its cmdline module's, and what
/// `/init` must know about the test disk (as `systest` writes them).
fn guest_kernel_args(test: &SysTest) -> Option<Vec<String>> {
    let args = test.modules.iter().find_map(|m| match m.content {
        Content::Linux(LinuxFile::Cmdline { args, .. }) => Some(args),
        _ => None,
    })?;
    let disk = linux::TestDisk::for_image(&linux::test_disk_image());
    Some(
        args.split_whitespace()
            .map(String::from)
            .chain(disk.kernel_args())
            .collect(),
    )
}

/// The guest's RAM in MiB: the `ram guest <n>M` line of `test`'s manifest.
fn guest_ram_mib(test: &SysTest) -> Option<u32> {
    test.modules.iter().find_map(|m| match m.content {
        Content::Text { text, .. } if m.name == "manifest" => text.lines().find_map(|l| {
            let size = l
                .trim()
                .strip_prefix("ram guest ")?
                .split_whitespace()
                .next()?;
            size.strip_suffix('M')?.parse().ok()
        }),
        _ => None,
    })
}

fn linux_timeout(emu: Emulator) -> Duration {
    match emu {
        Emulator::Qemu => LINUX_QEMU_TIMEOUT,
        Emulator::Bochs => LINUX_BOCHS_TIMEOUT,
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// The emulator boots Linux itself; ends at `MOAT-INIT start`.
    Direct,
    /// Linux under Moat's VMM; runs to the guest's power-off.
    Moat,
}

/// One kind of boot on one emulator, ready to start (again).
struct Boot {
    kind: Kind,
    emu: Emulator,
    launch: Launch,
    serial: PathBuf,
    /// The emulator's own output.
    output: PathBuf,
}

impl Boot {
    fn direct(emu: Emulator, guest: &linux::Guest, args: &[String], mib: u32) -> Result<Boot> {
        let dir = Path::new(BENCH_DIR).join(LINUX);
        let base = dir.join(format!("{}-direct", emu.name()));
        let serial = base.with_extension("log");
        let launch = match emu {
            Emulator::Qemu => {
                let mut qemu = linux::direct_qemu_args(guest, args, &serial, mib);
                qemu.push("-no-reboot".into());
                Launch::Qemu(qemu)
            }
            Emulator::Bochs => {
                // Booted directly, Linux would take the TSC rate from
                // Bochs' CPUID (3500 MHz) while the TSC counts
                // instructions: its delays would last 70 times too long.
                // Under Moat the guest learns the real rate through
                // kvm-clock; tell the direct guest too.
                let mut args = args.to_vec();
                args.push(format!("tsc_early_khz={}", emu::BOCHS_IPS / 1000));
                let iso = base.with_extension("iso");
                linux::make_iso(guest, &args, &base.with_extension("isodir"), &iso)?;
                let files = BochsFiles {
                    iso,
                    serial: serial.clone(),
                    log: base.with_extension("bochslog"),
                    bochsrc: base.with_extension("bochsrc"),
                    debugger_rc: dir.join("bochs.rc"),
                    memory_mib: mib,
                    cpus: 1,
                };
                emu::prepare_bochs(&files)?;
                Launch::Bochs(files)
            }
        };
        Ok(Boot {
            kind: Kind::Direct,
            emu,
            launch,
            output: base.with_extension("out"),
            serial,
        })
    }

    fn moat(test: &SysTest, emu: Emulator, boot: &image::BootSpec) -> Result<Boot> {
        let base = Path::new(BENCH_DIR)
            .join(LINUX)
            .join(format!("{}-moat", emu.name()));
        let serial = base.with_extension("log");
        Ok(Boot {
            kind: Kind::Moat,
            emu,
            launch: systest::prepare(test, emu, boot, &serial)?,
            output: base.with_extension("out"),
            serial,
        })
    }

    fn label(&self) -> &'static str {
        match self.kind {
            Kind::Direct => "direct",
            Kind::Moat => "moat",
        }
    }

    /// Boots once; also says whether the boot went as it must (the Moat
    /// boot: every `/init` check passed and the guest powered off).
    fn run(&self) -> Result<(BootRun, String, bool)> {
        emu::remove_stale(&self.serial)?;
        let read = || {
            fs::read(&self.serial)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default()
        };
        let timeout = Some(linux_timeout(self.emu));
        let clock = SerialClock::start(&self.serial, &[INIT_START]);
        let finished = || {
            clock.poll();
            let serial = read();
            match self.kind {
                Kind::Direct => init_uptime(&serial).is_some(),
                Kind::Moat => serial.contains(GUEST_STOPPED),
            }
        };
        let outcome = match &self.launch {
            Launch::Qemu(args) => emu::run_qemu(args, timeout, Some(&finished), &self.output)?,
            Launch::Bochs(files) => {
                emu::run_bochs(files, timeout, false, Some(&finished), &self.output)?
            }
        };
        clock.poll();
        let serial = read();
        let run = BootRun {
            wall: clock.seen(INIT_START).map(|d| d.as_secs_f64()),
            uptime: init_uptime(&serial),
            exits: (self.kind == Kind::Moat)
                .then(|| parse_exits(&serial))
                .flatten(),
        };
        let mut note = match outcome.exit {
            Exit::Status(status) => self.emu.describe_exit(status),
            Exit::TimedOut => format!("timed out after {}", crate::util::secs(outcome.elapsed)),
            Exit::Decided => "stopped".to_string(),
        };
        let mut ok = run.wall.is_some() && run.uptime.is_some();
        if self.kind == Kind::Moat {
            let report = linux::init_report(&serial);
            let _ = write!(
                note,
                "; /init checks {} ok, {} failed{}",
                report.passed.len(),
                report.failed.len(),
                if report.done { "" } else { ", not done" }
            );
            let powered_off = serial.contains(GUEST_POWER_OFF);
            if !powered_off {
                note.push_str(", no power-off");
            }
            ok &= run.exits.is_some() && report.done && report.failed.is_empty() && powered_off;
        }
        Ok((run, note, ok))
    }
}

/// `cargo xtask bench linux`.
pub fn run_linux(opts: &BenchOpts) -> Result<ExitCode> {
    setup::run()?;
    let artifacts = build::build_all()?;
    image::assemble(&artifacts)?;
    let guest = linux::build()?;
    let test = moat_linux_test()?;
    let missing = |what: &str| Error::Other(format!("system test `{LINUX_TEST}` has no {what}"));
    let args = guest_kernel_args(&test).ok_or_else(|| missing("cmdline module"))?;
    let mib = guest_ram_mib(&test).ok_or_else(|| missing("`ram guest` in its manifest"))?;
    let boot = systest::boot_spec(&test, &artifacts)?;
    let dir = Path::new(BENCH_DIR).join(LINUX);
    fs::create_dir_all(&dir).context(|| format!("cannot create {}", dir.display()))?;
    let emus: Vec<Emulator> = match opts.emu {
        Some(emu) => vec![emu],
        None => Emulator::ALL.to_vec(),
    };
    println!(
        "bench linux: {} run(s) of each boot on {}, {mib} MiB guest, kernel arguments: {} \
         (logs in {}/)",
        opts.runs,
        emus.iter().map(|e| e.name()).collect::<Vec<_>>().join(", "),
        args.join(" "),
        dir.display()
    );
    let mut results = Vec::new();
    let mut complete = true;
    for &emu in &emus {
        let boots = [
            Boot::direct(emu, &guest, &args, mib)?,
            Boot::moat(&test, emu, &boot)?,
        ];
        let mut result = LinuxResult {
            emu,
            direct: Vec::new(),
            moat: Vec::new(),
        };
        for run in 1..=opts.runs {
            for boot in &boots {
                let (figures, note, ok) = boot.run()?;
                let show = |v: Option<f64>| v.map_or("never".into(), |v| format!("{v:.2}s"));
                println!(
                    "{} linux [{}] {} run {run}: wall {}, uptime {} ({note}; serial {})",
                    if ok { "ok  " } else { "FAIL" },
                    emu.name(),
                    boot.label(),
                    show(figures.wall),
                    show(figures.uptime),
                    boot.serial.display()
                );
                complete &= ok;
                match boot.kind {
                    Kind::Direct => result.direct.push(figures),
                    Kind::Moat => result.moat.push(figures),
                }
            }
        }
        results.push(result);
    }
    print!("\n{}", linux_table(&results));
    let json = Path::new(BENCH_DIR).join(format!("{LINUX}.json"));
    fs::write(&json, linux_json(&results))
        .context(|| format!("cannot write {}", json.display()))?;
    println!("bench linux: wrote {}", json.display());
    Ok(if complete {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub fn linux_table(results: &[LinuxResult]) -> String {
    let cell = |v: Option<f64>, unit: &str| v.map_or("-".into(), |v| format!("{v:.2}{unit}"));
    let mut out = format!(
        "{:<9} {:<12} {:>4} {:>12} {:>10} {:>14} {:>11}\n",
        "emulator", "boot", "runs", "wall median", "wall min", "uptime median", "uptime min"
    );
    for r in results {
        let direct = Figures::of(&r.direct);
        let moat = Figures::of(&r.moat);
        for (boot, runs, f, unit) in [
            ("direct", r.direct.len().to_string(), direct, "s"),
            ("moat", r.moat.len().to_string(), moat, "s"),
            ("moat/direct", String::new(), moat.ratio(direct), "x"),
        ] {
            let _ = writeln!(
                out,
                "{:<9} {boot:<12} {runs:>4} {:>12} {:>10} {:>14} {:>11}",
                r.emu.name(),
                cell(f.wall.map(|s| s.median), unit),
                cell(f.wall.map(|s| s.min), unit),
                cell(f.uptime.map(|s| s.median), unit),
                cell(f.uptime.map(|s| s.min), unit),
            );
        }
    }
    out.push_str(
        "VMM exits of the Moat boot, to power-off (both guest boots and every check; \
         the run with the median total):\n",
    );
    for r in results {
        let exits = r.median_exits().map_or("-".into(), |e| {
            let reasons: Vec<String> = e
                .by_reason
                .iter()
                .map(|(n, c)| format!("{n} {c}"))
                .collect();
            format!("{}: {}", e.total, reasons.join(" "))
        });
        let _ = writeln!(out, "{:<9} {exits}", r.emu.name());
    }
    out
}

/// Seconds and ratios to the millisecond (`null` when missing).
fn json_number(v: Option<f64>) -> Value {
    v.map_or(Value::Null, |v| json!((v * 1000.0).round() / 1000.0))
}

fn json_summary(s: Option<Summary>) -> Value {
    s.map_or(
        Value::Null,
        |s| json!({"median": json_number(Some(s.median)), "min": json_number(Some(s.min))}),
    )
}

fn json_figures(f: Figures) -> serde_json::Map<String, Value> {
    let mut map = serde_json::Map::new();
    map.insert("wall".into(), json_summary(f.wall));
    map.insert("uptime".into(), json_summary(f.uptime));
    map
}

fn json_exits(e: Option<&Exits>) -> Value {
    e.map_or(Value::Null, |e| {
        let mut map = serde_json::Map::new();
        map.insert("total".into(), json!(e.total));
        for (name, count) in &e.by_reason {
            map.insert(name.clone(), json!(count));
        }
        Value::Object(map)
    })
}

fn json_samples(runs: &[BootRun]) -> Value {
    runs.iter()
        .map(|r| {
            let mut map = serde_json::Map::new();
            map.insert("wall".into(), json_number(r.wall));
            map.insert("uptime".into(), json_number(r.uptime));
            if let Some(e) = &r.exits {
                map.insert("exits".into(), json!(e.total));
            }
            Value::Object(map)
        })
        .collect()
}

pub fn linux_json(results: &[LinuxResult]) -> String {
    let entries: Vec<Value> = results
        .iter()
        .map(|r| {
            let direct = Figures::of(&r.direct);
            let moat = Figures::of(&r.moat);
            let mut moat_figures = json_figures(moat);
            moat_figures.insert("exits".into(), json_exits(r.median_exits()));
            json!({
                "emulator": r.emu.name(),
                "runs": r.direct.len().max(r.moat.len()),
                "direct": json_figures(direct),
                "moat": moat_figures,
                "ratio": json_figures(moat.ratio(direct)),
                "samples": {"direct": json_samples(&r.direct), "moat": json_samples(&r.moat)},
            })
        })
        .collect();
    json_text(&json!({
        "benchmark": LINUX,
        "unit": LINUX_UNIT,
        "method": LINUX_METHOD,
        "results": entries,
    }))
}

// ---------------------------------------------------------------- bench (all)

const ALL: &str = "all";
/// The system test whose `words6` case is the native row, and the name
/// under which its `bench all` boots write their files.
const ALL_NATIVE_TEST: &str = "bench_all_ipc";
/// The same for the Linux boots; also the directory (under
/// `target/systest/`) of their generated modules, apart from the `linux`
/// test's, which may be running at the same time.
const ALL_LINUX_TEST: &str = "bench_all_linux";
const CHART: &str = "bench.svg";
/// Makes the guest's `/init` run its benchmarks after its checks.
const BENCH_ARG: &str = "moat.bench=1";
/// In the `linux` test's forbidden list: what a failed check of `/init`
/// (or any component's failure) prints.
const ANY_FAILURE: &str = "FAIL";
/// What `/init` puts before each benchmark's result line.
const GUEST_BENCH: &str = "MOAT-BENCH ";
/// The `bench ipc` case the native row shows: six words each way, the
/// message the guest's hypercall carries.
const NATIVE_CASE: &str = "words6";
/// QEMU counting instructions. `sleep=off`: while the guest idles (waiting
/// for the modem's answer, say) virtual time jumps to the next timer
/// instead of following the host's clock, so idle stretches count
/// deterministically too.
const ICOUNT: &[&str] = &["-icount", "shift=0,sleep=off"];
/// Emulators at a time (the machines here have two cores).
const ALL_PARALLEL: usize = 2;
const ALL_METHOD: &str = "round trips timed with the TSC by the caller; median and minimum \
over the timed iterations. native = ping->echo between two native PDs (bench ipc case words6, \
10,000 iterations after 100 warm-up); hypercall = ipcbench in Linux user space calling the native \
echo portal with the IPC hypercall (10,000); port = portbench writing AT<CR> to the virtio-console \
port `modem` and reading to the final OK, through the guest's driver, the VMM's device model and \
its relay to the native modem (1,000 after 10 warm-up); pipe = pingpong, one byte each way \
between two Linux processes over pipes (10,000 after 100 warm-up). The guest rows come from one \
boot of the `linux` system test with moat.bench=1 (it passes only if every check of /init \
passes too; a failed check does not stop the benchmarks). Columns: \
qemu cycles = QEMU TCG without -icount, whose guest TSC is the host's (wall-clock, noisy); \
qemu instructions = QEMU -icount shift=0,sleep=off; bochs instructions = Bochs with clock: \
sync=none; in both the TSC advances one per instruction (idle time jumps to the next timer \
deterministically), so the figures are instruction counts";

/// The round trips `cargo xtask bench` compares, one table row each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoundTrip {
    /// `ping` to `echo`, two native PDs (`bench ipc`'s `words6`).
    Native,
    /// Linux user space to the native `echo`: the IPC hypercall (`ipcbench`).
    Hypercall,
    /// Linux user space to the native `modem`: `AT` over the virtio-console
    /// port, through the VMM (`portbench`).
    Port,
    /// Two Linux processes, one byte each way over pipes (`pingpong`).
    Pipe,
}

impl RoundTrip {
    pub const ALL: [RoundTrip; 4] = [
        RoundTrip::Native,
        RoundTrip::Hypercall,
        RoundTrip::Port,
        RoundTrip::Pipe,
    ];

    /// Its name in the JSON.
    pub fn key(self) -> &'static str {
        match self {
            RoundTrip::Native => "native",
            RoundTrip::Hypercall => "hypercall",
            RoundTrip::Port => "port",
            RoundTrip::Pipe => "pipe",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            RoundTrip::Native => "native <-> native IPC",
            RoundTrip::Hypercall => "guest -> native hypercall",
            RoundTrip::Port => "guest -> native, virtio port + VMM",
            RoundTrip::Pipe => "Linux pipe ping-pong",
        }
    }

    /// Its label in the chart, in two short lines.
    fn chart_label(self) -> [&'static str; 2] {
        match self {
            RoundTrip::Native => ["native <-> native", "IPC (ping, echo)"],
            RoundTrip::Hypercall => ["guest -> native", "IPC hypercall"],
            RoundTrip::Port => ["guest -> native via", "virtio port + VMM"],
            RoundTrip::Pipe => ["Linux pipe ping-pong", "two processes"],
        }
    }

    /// The guest tool whose `MOAT-BENCH` line it is; `None` for the native
    /// row.
    pub fn tool(self) -> Option<&'static str> {
        match self {
            RoundTrip::Native => None,
            RoundTrip::Hypercall => Some("ipcbench"),
            RoundTrip::Port => Some("portbench"),
            RoundTrip::Pipe => Some("pingpong"),
        }
    }
}

/// What the guest's TSC counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// The host's TSC (QEMU TCG without `-icount`).
    Cycles,
    /// One per instruction.
    Instructions,
}

impl Unit {
    pub fn name(self) -> &'static str {
        match self {
            Unit::Cycles => "cycles",
            Unit::Instructions => "instructions",
        }
    }
}

/// One emulator and what its guests' TSC counts there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Column {
    pub emu: Emulator,
    pub unit: Unit,
}

/// Bochs' TSC counts instructions whatever its settings, so it has no
/// cycles column.
pub const COLUMNS: [Column; 3] = [
    Column {
        emu: Emulator::Qemu,
        unit: Unit::Cycles,
    },
    Column {
        emu: Emulator::Qemu,
        unit: Unit::Instructions,
    },
    Column {
        emu: Emulator::Bochs,
        unit: Unit::Instructions,
    },
];

impl Column {
    pub fn name(self) -> String {
        format!("{} {}", self.emu.name(), self.unit.name())
    }

    /// Added to QEMU's command line.
    fn qemu_args(self) -> &'static [&'static str] {
        match (self.emu, self.unit) {
            (Emulator::Qemu, Unit::Instructions) => ICOUNT,
            _ => &[],
        }
    }

    /// How the emulator's clock is set, for the JSON and the chart.
    fn clock(self) -> &'static str {
        match (self.emu, self.unit) {
            (Emulator::Qemu, Unit::Cycles) => "QEMU TCG, the guest TSC is the host's",
            (Emulator::Qemu, Unit::Instructions) => "QEMU -icount shift=0,sleep=off",
            (Emulator::Bochs, _) => "Bochs clock: sync=none",
        }
    }

    fn color(self) -> &'static str {
        match (self.emu, self.unit) {
            (Emulator::Qemu, Unit::Cycles) => "#e07b39",
            (Emulator::Qemu, Unit::Instructions) => "#3a78b5",
            (Emulator::Bochs, _) => "#4c9a52",
        }
    }
}

/// A round trip's median and minimum over `count` timed iterations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Measure {
    pub median: u64,
    pub min: u64,
    pub count: u64,
}

/// One cell of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Figure {
    pub trip: RoundTrip,
    pub column: Column,
    pub measure: Measure,
}

fn find(figures: &[Figure], trip: RoundTrip, column: Column) -> Option<Measure> {
    figures
        .iter()
        .find(|f| f.trip == trip && f.column == column)
        .map(|f| f.measure)
}

/// Every complete, well-formed
/// `MOAT-BENCH <tool>: <n> <what>, median <x> cycles, min <y> cycles` line
/// of a serial log: the tool and its figures.
pub fn parse_guest(serial: &str) -> Vec<(String, Measure)> {
    complete_lines(serial)
        .filter_map(|line| {
            let (_, rest) = line.split_once(GUEST_BENCH)?;
            let (tool, rest) = rest.split_once(": ")?;
            if tool.is_empty() || !tool.chars().all(|c| c.is_ascii_alphanumeric()) {
                return None;
            }
            let words: Vec<&str> = rest.split([' ', ',']).filter(|w| !w.is_empty()).collect();
            // `<key> <number> cycles`.
            let figure = |key: &str| -> Option<u64> {
                let at = words.iter().position(|w| *w == key)?;
                if words.get(at + 2) != Some(&"cycles") {
                    return None;
                }
                words.get(at + 1)?.parse().ok()
            };
            Some((
                tool.to_string(),
                Measure {
                    count: words.first()?.parse().ok()?,
                    median: figure("median")?,
                    min: figure("min")?,
                },
            ))
        })
        .collect()
}

/// The figures in one boot's serial log, measured in `column`: the native
/// row from `ping`'s `bench ipc` lines, the guest rows from `/init`'s
/// `MOAT-BENCH` lines (the last of each).
pub fn figures_of(serial: &str, column: Column) -> Vec<Figure> {
    let native = parse(serial, "ipc");
    let guest = parse_guest(serial);
    RoundTrip::ALL
        .into_iter()
        .filter_map(|trip| {
            let measure = match trip.tool() {
                None => native
                    .iter()
                    .rfind(|r| r.case == NATIVE_CASE)
                    .map(|r| Measure {
                        median: r.median,
                        min: r.min,
                        count: r.iterations,
                    }),
                Some(tool) => guest.iter().rfind(|(t, _)| t == tool).map(|(_, m)| *m),
            }?;
            Some(Figure {
                trip,
                column,
                measure,
            })
        })
        .collect()
}

/// `test` (the `linux` system test) with the guest's benchmarks: `moat.bench=1`
/// on its command line, its generated modules under their own directory,
/// and each benchmark's line expected before `MOAT-INIT done`. Every check
/// of `/init` must still pass. `None` if it has no command-line module.
pub fn with_benchmarks(test: &SysTest) -> Option<SysTest> {
    let args = test.modules.iter().find_map(|m| match m.content {
        Content::Linux(LinuxFile::Cmdline { args, .. }) => Some(args),
        _ => None,
    })?;
    // The system tests are compile-time tables of `'static` data; this one
    // description is made once per run of the xtask, so its parts are
    // leaked rather than giving `SysTest` a lifetime for one caller.
    let args: &'static str = format!("{args} {BENCH_ARG}").leak();
    let dir = ALL_LINUX_TEST;
    let modules: Vec<ModuleSpec> = test
        .modules
        .iter()
        .map(|m| {
            let content = match m.content {
                Content::Task(task) => Content::Task(task),
                Content::Truncated { task, len, .. } => Content::Truncated { task, len, dir },
                Content::Text { text, .. } => Content::Text { text, dir },
                Content::Zeros { len, .. } => Content::Zeros { len, dir },
                Content::Linux(LinuxFile::Kernel) => Content::Linux(LinuxFile::Kernel),
                Content::Linux(LinuxFile::Initramfs) => Content::Linux(LinuxFile::Initramfs),
                Content::Linux(LinuxFile::Disk { .. }) => Content::Linux(LinuxFile::Disk { dir }),
                Content::Linux(LinuxFile::Cmdline { .. }) => {
                    Content::Linux(LinuxFile::Cmdline { args, dir })
                }
                Content::Linux(LinuxFile::TruncatedKernel { .. }) => {
                    Content::Linux(LinuxFile::TruncatedKernel { dir })
                }
                Content::Multiboot { task, patch, .. } => Content::Multiboot { task, patch, dir },
            };
            ModuleSpec {
                name: m.name,
                content,
                args: m.args,
            }
        })
        .collect();
    let mut expect: Vec<Expect> = test
        .expect
        .iter()
        .map(|e| Expect {
            text: e.text,
            only: e.only,
        })
        .collect();
    let done = expect
        .iter()
        .position(|e| e.text.starts_with(linux::INIT_DONE))
        .unwrap_or(expect.len());
    let lines = RoundTrip::ALL
        .into_iter()
        .filter_map(|t| t.tool())
        .map(|tool| Expect {
            text: format!("{GUEST_BENCH}{tool}: ").leak(),
            only: None,
        });
    expect.splice(done..done, lines);
    Some(SysTest {
        name: ALL_LINUX_TEST,
        modules: modules.leak(),
        expect: expect.leak(),
        ..*test
    })
}

fn all_timeout(linux: bool, emu: Emulator) -> Duration {
    let secs = match (linux, emu) {
        (false, Emulator::Qemu) => 120,
        (false, Emulator::Bochs) => 300,
        // Two Linux boots (the disk check reboots once), every check, the
        // benchmarks; QEMU counting instructions runs slower than TCG.
        (true, Emulator::Qemu) => 600,
        (true, Emulator::Bochs) => 1500,
    };
    Duration::from_secs(secs)
}

/// One boot of `cargo xtask bench`, ready to start.
struct AllJob {
    test: SysTest,
    column: Column,
    linux: bool,
    serial: PathBuf,
    launch: Launch,
}

impl AllJob {
    fn new(base: &SysTest, column: Column, linux: bool, artifacts: &Artifacts) -> Result<AllJob> {
        let test = SysTest {
            qemu_args: column.qemu_args(),
            ..*base
        };
        let what = if linux { "linux" } else { "ipc" };
        let serial = Path::new(BENCH_DIR).join(ALL).join(format!(
            "{what}-{}-{}.log",
            column.emu.name(),
            column.unit.name()
        ));
        let boot = systest::boot_spec(&test, artifacts)?;
        let launch = systest::prepare(&test, column.emu, &boot, &serial)?;
        Ok(AllJob {
            test,
            column,
            linux,
            serial,
            launch,
        })
    }

    fn label(&self) -> String {
        format!("{} [{}]", self.test.name, self.column.name())
    }

    fn read_serial(&self) -> String {
        fs::read(&self.serial)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Whether the run can stop: everything expected is there, or something
    /// forbidden is. But a failed check of `/init` does not stop a Linux
    /// boot: the benchmarks after it still run and their figures count
    /// (the run is still a failure); it ends when the guest stops.
    fn decided(&self, serial: &str) -> bool {
        let emu = self.column.emu;
        let forbidden = self
            .test
            .forbidden()
            .into_iter()
            .filter(|f| !(self.linux && *f == ANY_FAILURE))
            .any(|f| serial.contains(f));
        let complete = systest::judge(serial, &self.test.expected_on(emu), &[]).is_ok();
        // A guest that stopped decides the run once the root task has
        // torn its VMM down (the last expected line, even when a check
        // failed and others will never come).
        let torn_down = serial
            .find(GUEST_STOPPED)
            .is_some_and(|at| serial[at..].contains(LINUX_COMPONENT_ENDED));
        forbidden || complete || (self.linux && torn_down)
    }

    /// Boots until the output decides the run; prints a PASS or FAIL line
    /// and says which.
    fn execute(&self) -> Result<bool> {
        let emu = self.column.emu;
        let timeout = Some(all_timeout(self.linux, emu));
        let output = self.serial.with_extension("out");
        let decided = || self.decided(&self.read_serial());
        let outcome = match &self.launch {
            Launch::Qemu(args) => emu::run_qemu(args, timeout, Some(&decided), &output)?,
            Launch::Bochs(files) => emu::run_bochs(files, timeout, false, Some(&decided), &output)?,
        };
        let time = crate::util::secs(outcome.elapsed);
        let verdict = systest::verdict(&self.test, emu, &self.read_serial());
        let exit = match outcome.exit {
            Exit::Status(status) => emu.describe_exit(status),
            Exit::TimedOut => format!("timed out after {time}"),
            Exit::Decided => "stopped once the output decided the run".into(),
        };
        match &verdict {
            Ok(()) => println!("PASS {} {time}", self.label()),
            Err(why) => {
                println!("FAIL {} {time}: {why} (emulator {exit})", self.label());
                for line in crate::util::tail(&self.read_serial(), 30) {
                    println!("    {line}");
                }
            }
        }
        Ok(verdict.is_ok())
    }
}

/// `cargo xtask bench` (and `bench all`).
pub fn run_all(opts: &BenchOpts) -> Result<ExitCode> {
    setup::run()?;
    let artifacts = build::build_all()?;
    image::assemble(&artifacts)?;
    let linux_test = systest::TESTS
        .iter()
        .find(|t| t.name == LINUX_TEST)
        .and_then(with_benchmarks)
        .ok_or_else(|| {
            Error::Other(format!(
                "no system test `{LINUX_TEST}` with a cmdline module"
            ))
        })?;
    let native_test = SysTest {
        name: ALL_NATIVE_TEST,
        ..BENCH_IPC
    };
    let columns: Vec<Column> = COLUMNS
        .into_iter()
        .filter(|c| opts.emu.is_none_or(|emu| emu == c.emu))
        .collect();
    let dir = Path::new(BENCH_DIR).join(ALL);
    fs::create_dir_all(&dir).context(|| format!("cannot create {}", dir.display()))?;
    // Every boot is prepared (its module files written) before any
    // starts; Bochs and Linux first, the longest runs.
    let mut jobs = Vec::new();
    for linux in [true, false] {
        for &column in columns.iter().rev() {
            let base = if linux { &linux_test } else { &native_test };
            jobs.push(AllJob::new(base, column, linux, &artifacts)?);
        }
    }
    jobs.sort_by_key(|j| (j.column.emu != Emulator::Bochs, !j.linux));
    println!(
        "bench: {} boots on {} (two at a time; logs in {}/)",
        jobs.len(),
        columns
            .iter()
            .map(|c| c.name())
            .collect::<Vec<_>>()
            .join(", "),
        dir.display()
    );
    let next = AtomicUsize::new(0);
    let passed = Mutex::new(vec![false; jobs.len()]);
    let failure = Mutex::new(None);
    thread::scope(|s| {
        for _ in 0..ALL_PARALLEL.min(jobs.len()) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(job) = jobs.get(i) else { break };
                match job.execute() {
                    Ok(ok) => passed.lock().unwrap_or_else(PoisonError::into_inner)[i] = ok,
                    Err(e) => {
                        println!("FAIL {}: {e}", job.label());
                        failure
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .get_or_insert(e);
                    }
                }
            });
        }
    });
    if let Some(e) = failure.into_inner().unwrap_or_else(PoisonError::into_inner) {
        return Err(e);
    }
    let passed = passed.into_inner().unwrap_or_else(PoisonError::into_inner);

    let mut figures = Vec::new();
    let mut ipc_rows = Vec::new();
    for job in &jobs {
        let serial = job.read_serial();
        figures.extend(figures_of(&serial, job.column));
        if !job.linux && job.column.unit == Unit::Instructions {
            ipc_rows.extend(
                parse(&serial, "ipc")
                    .into_iter()
                    .map(|r| (job.column.emu, r)),
            );
        }
    }
    let mut complete = passed.iter().all(|&ok| ok);
    for trip in RoundTrip::ALL {
        for &column in &columns {
            if find(&figures, trip, column).is_none() {
                complete = false;
                println!("bench: no figure for {} on {}", trip.label(), column.name());
            }
        }
    }
    print!("\n{}", all_table(&columns, &figures));
    let write = |name: &str, text: String| -> Result<()> {
        let path = Path::new(BENCH_DIR).join(name);
        fs::write(&path, text).context(|| format!("cannot write {}", path.display()))?;
        println!("bench: wrote {}", path.display());
        Ok(())
    };
    write(&format!("{ALL}.json"), all_json(&columns, &figures))?;
    write(CHART, all_svg(&columns, &figures))?;
    // The same figures `bench ipc` gives, from the same boots.
    if !ipc_rows.is_empty() {
        write("ipc.json", to_json_named(&ipc_rows, "ipc", METHOD))?;
    }
    Ok(if complete {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `median / min`, or `-` where there is no figure.
fn cell(measure: Option<Measure>) -> String {
    measure.map_or("-".into(), |m| format!("{} / {}", m.median, m.min))
}

pub fn all_table(columns: &[Column], figures: &[Figure]) -> String {
    const LABEL: usize = 36;
    const CELL: usize = 21;
    let mut out = format!("{:<LABEL$}", "round trip: median / min");
    for c in columns {
        let _ = write!(out, " {:>CELL$}", c.name());
    }
    out.push('\n');
    for trip in RoundTrip::ALL {
        let _ = write!(out, "{:<LABEL$}", trip.label());
        for &c in columns {
            let _ = write!(out, " {:>CELL$}", cell(find(figures, trip, c)));
        }
        out.push('\n');
    }
    for c in columns {
        let _ = writeln!(out, "{}: {}", c.name(), c.clock());
    }
    out
}

/// Every row in every column, `null` where a figure is missing.
pub fn all_json(columns: &[Column], figures: &[Figure]) -> String {
    let column_entries: Vec<Value> = columns
        .iter()
        .map(|c| json!({"emulator": c.emu.name(), "unit": c.unit.name(), "clock": c.clock()}))
        .collect();
    let mut results = Vec::new();
    for trip in RoundTrip::ALL {
        for &c in columns {
            let m = find(figures, trip, c);
            results.push(json!({
                "round_trip": trip.key(),
                "label": trip.label(),
                "emulator": c.emu.name(),
                "unit": c.unit.name(),
                "median": m.map(|m| m.median),
                "min": m.map(|m| m.min),
                "count": m.map(|m| m.count),
            }));
        }
    }
    json_text(&json!({
        "benchmark": ALL,
        "method": ALL_METHOD,
        "columns": column_entries,
        "results": results,
    }))
}

/// `text` safe inside an XML element or attribute.
fn xml_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// `v` in three significant digits with a k, M or G suffix: 1038 is
/// `1.04k`, 1000 is `1k`.
fn compact(v: f64) -> String {
    let (scaled, suffix) = [(1e9, "G"), (1e6, "M"), (1e3, "k")]
        .into_iter()
        .find(|(unit, _)| v >= *unit)
        .map_or((v, ""), |(unit, suffix)| (v / unit, suffix));
    let digits = if scaled < 10.0 {
        2
    } else if scaled < 100.0 {
        1
    } else {
        0
    };
    let text = format!("{scaled:.digits$}");
    let text = if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.')
    } else {
        &text
    };
    format!("{text}{suffix}")
}

const SVG_WIDTH: f64 = 900.0;
const SVG_HEIGHT: f64 = 500.0;
const PLOT_LEFT: f64 = 80.0;
const PLOT_RIGHT: f64 = 880.0;
const PLOT_TOP: f64 = 105.0;
const PLOT_BOTTOM: f64 = 400.0;

/// A grouped bar chart: one group per round trip, one bar per column, its
/// height the median on a log scale, a black line across it at the
/// minimum. Written by hand: it is one fixed chart of rectangles, lines
/// and text in about 80 lines, which a plotting crate (plotters and its
/// font stack) would not make shorter or clearer.
pub fn all_svg(columns: &[Column], figures: &[Figure]) -> String {
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{SVG_WIDTH}\" height=\"{SVG_HEIGHT}\" \
         viewBox=\"0 0 {SVG_WIDTH} {SVG_HEIGHT}\" font-family=\"sans-serif\">\n\
         <rect width=\"{SVG_WIDTH}\" height=\"{SVG_HEIGHT}\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"28\" text-anchor=\"middle\" font-size=\"18\">Moat: round trips \
         between native components and from a Linux guest</text>\n\
         <text x=\"{}\" y=\"48\" text-anchor=\"middle\" font-size=\"12\">bar: median, black \
         line: minimum; per round trip, log scale</text>\n",
        SVG_WIDTH / 2.0,
        SVG_WIDTH / 2.0
    );
    // One legend entry per column, its clock in small print below.
    let legend_step = (PLOT_RIGHT - PLOT_LEFT) / columns.len().max(1) as f64;
    for (i, c) in columns.iter().enumerate() {
        let x = PLOT_LEFT + i as f64 * legend_step;
        let _ = writeln!(
            svg,
            "<rect x=\"{x:.1}\" y=\"60\" width=\"12\" height=\"12\" fill=\"{}\"/>\
             <text x=\"{:.1}\" y=\"70\" font-size=\"12\">{}</text>\
             <text x=\"{:.1}\" y=\"84\" font-size=\"10\" fill=\"#555555\">{}</text>",
            c.color(),
            x + 16.0,
            xml_text(&c.name()),
            x + 16.0,
            xml_text(c.clock())
        );
    }
    let present: Vec<Figure> = figures
        .iter()
        .filter(|f| columns.contains(&f.column))
        .copied()
        .collect();
    let values = present
        .iter()
        .flat_map(|f| [f.measure.median, f.measure.min])
        .map(|v| v.max(1) as f64);
    let (Some(low), Some(high)) = (values.clone().reduce(f64::min), values.reduce(f64::max)) else {
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"16\">no results</text>",
            SVG_WIDTH / 2.0,
            (PLOT_TOP + PLOT_BOTTOM) / 2.0
        );
        svg.push_str("</svg>\n");
        return svg;
    };
    // A value just above a decade would get a bar of almost no height:
    // the axis starts a decade lower then.
    let low_exp = (low.log10() - 0.3).floor();
    let high_exp = high.log10().ceil().max(low_exp + 1.0);
    let y = |v: u64| {
        let fraction = ((v.max(1) as f64).log10() - low_exp) / (high_exp - low_exp);
        PLOT_BOTTOM - fraction * (PLOT_BOTTOM - PLOT_TOP)
    };
    // Decades: grid lines and their labels.
    let mut exp = low_exp;
    while exp <= high_exp {
        let value = 10f64.powf(exp);
        let fraction = (exp - low_exp) / (high_exp - low_exp);
        let at = PLOT_BOTTOM - fraction * (PLOT_BOTTOM - PLOT_TOP);
        let _ = writeln!(
            svg,
            "<line x1=\"{PLOT_LEFT}\" y1=\"{at:.1}\" x2=\"{PLOT_RIGHT}\" y2=\"{at:.1}\" \
             stroke=\"#dddddd\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" \
             font-size=\"12\">{}</text>",
            PLOT_LEFT - 6.0,
            at + 4.0,
            compact(value)
        );
        exp += 1.0;
    }
    let _ = writeln!(
        svg,
        "<line x1=\"{PLOT_LEFT}\" y1=\"{PLOT_TOP}\" x2=\"{PLOT_LEFT}\" y2=\"{PLOT_BOTTOM}\" \
         stroke=\"black\"/><line x1=\"{PLOT_LEFT}\" y1=\"{PLOT_BOTTOM}\" x2=\"{PLOT_RIGHT}\" \
         y2=\"{PLOT_BOTTOM}\" stroke=\"black\"/>\n<text transform=\"translate(22 {:.1}) \
         rotate(-90)\" text-anchor=\"middle\" font-size=\"12\">cycles or instructions \
         (log scale)</text>",
        (PLOT_TOP + PLOT_BOTTOM) / 2.0
    );
    let group = (PLOT_RIGHT - PLOT_LEFT) / RoundTrip::ALL.len() as f64;
    let bar = group * 0.8 / columns.len().max(1) as f64;
    for (g, trip) in RoundTrip::ALL.into_iter().enumerate() {
        let left = PLOT_LEFT + g as f64 * group + group * 0.1;
        for (b, &column) in columns.iter().enumerate() {
            let x = left + b as f64 * bar;
            let middle = x + bar / 2.0;
            let Some(m) = find(&present, trip, column) else {
                let _ = writeln!(
                    svg,
                    "<text x=\"{middle:.1}\" y=\"{:.1}\" text-anchor=\"middle\" \
                     font-size=\"10\">n/a</text>",
                    PLOT_BOTTOM - 4.0
                );
                continue;
            };
            let top = y(m.median);
            let _ = writeln!(
                svg,
                "<rect x=\"{:.1}\" y=\"{top:.1}\" width=\"{:.1}\" height=\"{:.1}\" \
                 fill=\"{}\"><title>{}, {}: median {}, min {}</title></rect>\n\
                 <line x1=\"{:.1}\" y1=\"{min:.1}\" x2=\"{:.1}\" y2=\"{min:.1}\" \
                 stroke=\"black\" stroke-width=\"2\"/>\n\
                 <text x=\"{middle:.1}\" y=\"{:.1}\" text-anchor=\"middle\" \
                 font-size=\"10\">{}</text>",
                x + 1.0,
                bar - 2.0,
                PLOT_BOTTOM - top,
                column.color(),
                xml_text(trip.label()),
                xml_text(&column.name()),
                m.median,
                m.min,
                x + 1.0,
                x + bar - 1.0,
                top - 4.0,
                compact(m.median as f64),
                min = y(m.min),
            );
        }
        let middle = PLOT_LEFT + (g as f64 + 0.5) * group;
        for (line, text) in trip.chart_label().into_iter().enumerate() {
            let _ = writeln!(
                svg,
                "<text x=\"{middle:.1}\" y=\"{:.1}\" text-anchor=\"middle\" \
                 font-size=\"12\">{}</text>",
                PLOT_BOTTOM + 18.0 + 15.0 * line as f64,
                xml_text(text)
            );
        }
    }
    let _ = writeln!(
        svg,
        "<text x=\"{PLOT_LEFT}\" y=\"{:.1}\" font-size=\"11\">cycles: the host's TSC as \
         QEMU TCG passes it through (wall-clock, noisy); instructions: the TSC advances one \
         per instruction (deterministic).</text>\n<text x=\"{PLOT_LEFT}\" y=\"{:.1}\" \
         font-size=\"11\">cargo xtask bench; method and figures: docs/benchmarks.md, \
         target/bench/all.json</text>",
        SVG_HEIGHT - 38.0,
        SVG_HEIGHT - 20.0
    );
    svg.push_str("</svg>\n");
    svg
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
        let json: Value = serde_json::from_str(&to_json_named(&rows(), "ipc", METHOD)).unwrap();
        assert_eq!(
            json["results"][0],
            json!({"case": "null", "emulator": "qemu", "median": 812, "min": 790, "iterations": 10000})
        );
        assert_eq!(json["unit"], "instructions");
        let empty: Value = serde_json::from_str(&to_json_named(&[], "a\"b\n", METHOD)).unwrap();
        assert_eq!(empty["results"], json!([]));
        assert_eq!(empty["benchmark"], "a\"b\n");
    }

    // ---- bench linux

    /// The end of a Moat serial log, as the VMM and `/init` print it.
    const MOAT_LOG: &str = "\
vmm: 256 MiB RAM, kernel 8029 KiB, initrd 2545 KiB, disk 1024 KiB
[    0.000000] Linux version 6.1.0-50-amd64
MOAT-INIT start uptime=2.66
MOAT-INIT reboot
vmm: guest reset (reset, rip 0xfff6)
MOAT-INIT start uptime=2.77
MOAT-INIT done checks=24 failed=0
vmm: exits 85346: io 76562 mmio 1866 cpuid 2389 msr 2992 hlt 1031 window 351 poked 155 other 0
vmm: 2 MSR accesses refused (#GP), the last a read of 0x179
vmm: guest stopped: power-off
";

    #[test]
    fn uptime_is_the_first_boots_and_needs_a_complete_line() {
        assert_eq!(init_uptime(MOAT_LOG), Some(2.66));
        // The direct boot's console ends lines with CR LF.
        assert_eq!(
            init_uptime("[ 1.0] x\r\nMOAT-INIT start uptime=7.31\r\n"),
            Some(7.31)
        );
        // Still being written: "uptime=1." would read as 1.0.
        assert_eq!(init_uptime("MOAT-INIT start uptime=1."), None);
        assert_eq!(init_uptime("MOAT-INIT start uptime=1.5\n"), Some(1.5));
        // Kernel text after it on the same line does not matter.
        assert_eq!(
            init_uptime("MOAT-INIT start uptime=3.25 [ 3.3] random: crng init done\n"),
            Some(3.25)
        );
        // A garbled first line is no figure, not the second boot's.
        let garbled = "MOAT-INIT start uptime=x\nMOAT-INIT start uptime=2.0\n";
        assert_eq!(init_uptime(garbled), None);
        for bad in [
            "MOAT-INIT start\n",
            "MOAT-INIT start up=1\n",
            "MOAT-INIT start uptime=-1\n",
            "MOAT-INIT start uptime=inf\n",
            "MOAT-INIT start uptime=NaN\n",
            "MOAT-INIT done\n",
            "",
        ] {
            assert_eq!(init_uptime(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn exits_line_is_parsed_by_reason() {
        let exits = parse_exits(MOAT_LOG).unwrap();
        assert_eq!(exits.total, 85346);
        let names: Vec<&str> = exits.by_reason.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["io", "mmio", "cpuid", "msr", "hlt", "window", "poked", "other"]
        );
        assert_eq!(exits.by_reason[0], ("io".to_string(), 76562));
        assert_eq!(
            exits.by_reason.iter().map(|(_, c)| c).sum::<u64>(),
            exits.total
        );
        // The last complete, well-formed line counts.
        let two = "vmm: exits 3: io 3\n~~vmm: exits 5: io 4 hlt 1\nvmm: exits 9: io 9";
        assert_eq!(
            parse_exits(two),
            Some(Exits {
                total: 5,
                by_reason: vec![("io".into(), 4), ("hlt".into(), 1)]
            })
        );
        for bad in [
            "vmm: exits 5: io\n",
            "vmm: exits 5: io 4 hlt\n",
            "vmm: exits 5: io x\n",
            "vmm: exits 5: 4 io\n",
            "vmm: exits 5 io 4\n",
            "vmm: exits x: io 4\n",
            "vmm: exits 5:\n",
            "vmm: exits 5: io -1\n",
            "vmm: exits 99999999999999999999: io 1\n",
            "vmm: 2 MSR accesses refused\n",
        ] {
            assert_eq!(parse_exits(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn summaries_take_the_lower_median_and_the_minimum() {
        assert_eq!(summarize([]), None);
        assert_eq!(
            summarize([3.0]),
            Some(Summary {
                median: 3.0,
                min: 3.0
            })
        );
        assert_eq!(
            summarize([4.0, 1.0, 3.0, 2.0]),
            Some(Summary {
                median: 2.0,
                min: 1.0
            })
        );
        assert_eq!(
            summarize([5.0, f64::NAN, 1.0, 9.0]),
            Some(Summary {
                median: 5.0,
                min: 1.0
            })
        );
    }

    #[test]
    fn ratios_are_moat_over_direct() {
        let direct = Summary {
            median: 2.0,
            min: 1.5,
        };
        let moat = Summary {
            median: 5.0,
            min: 4.5,
        };
        assert_eq!(
            moat.ratio(direct),
            Some(Summary {
                median: 2.5,
                min: 3.0
            })
        );
        let zero = Summary {
            median: 0.0,
            min: 0.0,
        };
        assert_eq!(moat.ratio(zero), None);
        let run = |wall, uptime| BootRun {
            wall: Some(wall),
            uptime: Some(uptime),
            exits: None,
        };
        let d = Figures::of(&[run(10.0, 1.0), run(12.0, 1.0)]);
        let m = Figures::of(&[run(30.0, 2.5), BootRun::default(), run(20.0, 2.0)]);
        let r = m.ratio(d);
        assert_eq!(r.wall.unwrap().median, 2.0);
        assert_eq!(r.uptime.unwrap().min, 2.0);
        assert_eq!(m.ratio(Figures::default()), Figures::default());
    }

    fn linux_result() -> LinuxResult {
        let exits = |total| Exits {
            total,
            by_reason: vec![("io".into(), total)],
        };
        LinuxResult {
            emu: Emulator::Bochs,
            direct: vec![BootRun {
                wall: Some(100.0),
                uptime: Some(7.0),
                exits: None,
            }],
            moat: vec![
                BootRun {
                    wall: Some(250.0),
                    uptime: Some(31.5),
                    exits: Some(exits(70)),
                },
                BootRun {
                    wall: Some(240.0),
                    uptime: Some(31.0),
                    exits: Some(exits(60)),
                },
                BootRun {
                    wall: None,
                    uptime: None,
                    exits: Some(exits(90)),
                },
            ],
        }
    }

    #[test]
    fn median_exits_come_from_one_run() {
        assert_eq!(linux_result().median_exits().unwrap().total, 70);
        let none = LinuxResult {
            moat: vec![BootRun::default()],
            ..linux_result()
        };
        assert_eq!(none.median_exits(), None);
    }

    #[test]
    fn linux_table_and_json() {
        let table = linux_table(&[linux_result()]);
        let rows: Vec<Vec<&str>> = table
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            rows[1],
            ["bochs", "direct", "1", "100.00s", "100.00s", "7.00s", "7.00s"]
        );
        assert_eq!(
            rows[2],
            ["bochs", "moat", "3", "240.00s", "240.00s", "31.00s", "31.00s"]
        );
        assert_eq!(
            rows[3],
            ["bochs", "moat/direct", "2.40x", "2.40x", "4.43x", "4.43x"]
        );
        assert_eq!(rows[5], ["bochs", "70:", "io", "70"]);
        let json: Value = serde_json::from_str(&linux_json(&[linux_result()])).unwrap();
        assert_eq!(json["benchmark"], "linux");
        assert_eq!(json["unit"], "seconds");
        let r = &json["results"][0];
        assert_eq!(
            r["direct"],
            json!({"wall": {"median": 100.0, "min": 100.0}, "uptime": {"median": 7.0, "min": 7.0}})
        );
        assert_eq!(r["moat"]["exits"], json!({"total": 70, "io": 70}));
        assert_eq!(r["ratio"]["wall"], json!({"median": 2.4, "min": 2.4}));
        assert!(r["samples"]["moat"]
            .as_array()
            .unwrap()
            .contains(&json!({"wall": null, "uptime": null, "exits": 90})));
        let empty = LinuxResult {
            direct: vec![],
            moat: vec![],
            ..linux_result()
        };
        let json: Value = serde_json::from_str(&linux_json(&[empty])).unwrap();
        assert_eq!(
            json["results"][0]["direct"],
            json!({"wall": null, "uptime": null})
        );
        assert_eq!(json["results"][0]["moat"]["exits"], Value::Null);
        assert!(linux_table(&[]).lines().count() == 2);
    }

    #[test]
    fn direct_boot_gets_the_moat_guests_arguments_and_ram() {
        let test = moat_linux_test().unwrap();
        assert_eq!(test.name, "bench_linux");
        let args = guest_kernel_args(&test).unwrap();
        let disk = crate::linux::TestDisk::for_image(&crate::linux::test_disk_image());
        assert_eq!(
            args[..crate::linux::DIRECT_ARGS.len()],
            *crate::linux::DIRECT_ARGS
        );
        assert_eq!(args[args.len() - 2..], disk.kernel_args());
        assert_eq!(guest_ram_mib(&test), Some(256));
        assert!(crate::manifests::LINUX.contains("ram guest 256M"));
        let guest = crate::linux::Guest {
            kernel: "k".into(),
            initramfs: "i".into(),
        };
        let qemu = crate::linux::direct_qemu_args(&guest, &args, Path::new("s.log"), 256);
        assert!(qemu.windows(2).any(|w| w == ["-m", "256M"]), "{qemu:?}");
        assert!(qemu
            .windows(2)
            .any(|w| w[0] == "-append" && w[1] == args.join(" ")));
        // Tests without those modules give nothing rather than a guess.
        assert_eq!(guest_kernel_args(&BENCH_IPC), None);
        assert_eq!(guest_ram_mib(&BENCH_IPC), None);
    }

    #[test]
    fn parjob_line_is_parsed() {
        let serial = "x\nMOAT-BENCH parjob: 2 vCPUs, stress: done, 8123 cpu rounds, 0 memory passes of 0 MiB\n";
        assert_eq!(parse_parjob(serial), Some((2, 8123)));
        assert_eq!(
            parse_parjob("MOAT-BENCH parjob: 2 vCPUs, stress: done, 81"),
            None
        );
        assert_eq!(parse_parjob("MOAT-BENCH parjob FAIL stress: FAIL\n"), None);
    }

    #[test]
    fn serial_parsers_survive_garbage() {
        let mut x = 0x853c_49e6_748f_ea9bu64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let alphabet: Vec<char> =
            "0123456789.:- \n\rabcdefghimnopstuvwxyzMOAT-INIT startuptime=vmm: exits io"
                .chars()
                .collect();
        let base: Vec<char> = MOAT_LOG.chars().collect();
        for i in 0..5_000 {
            let text: String = if i % 2 == 0 {
                // Mutations of a real log.
                let mut t = base.clone();
                for _ in 0..1 + next() % 8 {
                    let at = (next() % t.len() as u64) as usize;
                    t[at] = alphabet[(next() % alphabet.len() as u64) as usize];
                }
                t.into_iter().collect()
            } else {
                (0..next() % 200)
                    .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                    .collect()
            };
            if let Some(u) = init_uptime(&text) {
                assert!(u.is_finite() && u >= 0.0, "{u} from {text:?}");
            }
            if let Some(e) = parse_exits(&text) {
                assert!(!e.by_reason.is_empty());
                assert!(e.by_reason.iter().all(|(n, _)| !n.is_empty()));
            }
        }
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

    // ---- bench (all)

    const GUEST_LOG: &str = "\
MOAT-CHECK ipc-hypercall ok ipcbench: 1000 calls, median 51688 cycles, min 50102 cycles
MOAT-BENCH ipcbench: 10000 calls, median 1990 cycles, min 1958 cycles
[    9.1] random: crng init done
MOAT-BENCH portbench: 1000 round trips, median 90500 cycles, min 88000 cycles
MOAT-BENCH pingpong: 10000 round trips, median 7200 cycles, min 7100 cycles
MOAT-BENCH pingpong: FAIL the child closed its end
MOAT-INIT done checks=28 failed=0
";

    const NATIVE_LOG: &str = "\
bench ipc null median=1038 min=1038 iterations=10000
bench ipc words6 median=1040 min=1039 iterations=10000
bench ipc words64 median=1606 min=1604 iterations=10000
";

    fn measure(median: u64, min: u64, count: u64) -> Measure {
        Measure { median, min, count }
    }

    #[test]
    fn guest_lines_are_parsed_by_tool() {
        let lines = parse_guest(GUEST_LOG);
        assert_eq!(
            lines,
            [
                ("ipcbench".to_string(), measure(1990, 1958, 10000)),
                ("portbench".to_string(), measure(90500, 88000, 1000)),
                ("pingpong".to_string(), measure(7200, 7100, 10000)),
            ]
        );
        for bad in [
            "MOAT-BENCH pingpong: 10 round trips, median 7 cycles, min 6 cycles",
            "MOAT-BENCH pingpong: 10 round trips, median 7 cycles\n",
            "MOAT-BENCH pingpong: 10 round trips, median x cycles, min 6 cycles\n",
            "MOAT-BENCH pingpong: 10 round trips, median 7, min 6 cycles\n",
            "MOAT-BENCH ping pong: 10 round trips, median 7 cycles, min 6 cycles\n",
            "MOAT-BENCH : 10 round trips, median 7 cycles, min 6 cycles\n",
            "MOAT-BENCH pingpong: many round trips, median 7 cycles, min 6 cycles\n",
            "MOAT-BENCH pingpong 10 round trips, median 7 cycles, min 6 cycles\n",
        ] {
            assert_eq!(parse_guest(bad), [], "{bad:?}");
        }
    }

    #[test]
    fn figures_come_from_both_kinds_of_log() {
        let qemu = COLUMNS[1];
        assert_eq!(
            figures_of(NATIVE_LOG, qemu),
            [Figure {
                trip: RoundTrip::Native,
                column: qemu,
                measure: measure(1040, 1039, 10000)
            }]
        );
        let guest = figures_of(GUEST_LOG, qemu);
        let trips: Vec<RoundTrip> = guest.iter().map(|f| f.trip).collect();
        assert_eq!(
            trips,
            [RoundTrip::Hypercall, RoundTrip::Port, RoundTrip::Pipe]
        );
        assert_eq!(guest[0].measure, measure(1990, 1958, 10000));
        assert_eq!(figures_of("", qemu), []);
    }

    /// Every row and column but the port row on Bochs.
    fn all_figures() -> Vec<Figure> {
        let mut figures = Vec::new();
        for (c, &column) in COLUMNS.iter().enumerate() {
            for (r, trip) in RoundTrip::ALL.into_iter().enumerate() {
                if trip == RoundTrip::Port && column.emu == Emulator::Bochs {
                    continue;
                }
                let base = 1000 * (10 * r as u64 + c as u64 + 1);
                figures.push(Figure {
                    trip,
                    column,
                    measure: measure(base + 7, base + 3, 10000),
                });
            }
        }
        figures
    }

    #[test]
    fn table_has_every_row_and_column() {
        let text = all_table(&COLUMNS, &all_figures());
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("round trip: median / min"));
        for c in COLUMNS {
            assert!(lines[0].contains(&c.name()), "{}", lines[0]);
        }
        for (r, trip) in RoundTrip::ALL.into_iter().enumerate() {
            let line = lines[1 + r];
            assert!(line.starts_with(trip.label()), "{line}");
            let cells: Vec<&str> = line[trip.label().len()..]
                .split("  ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .collect();
            let want: Vec<String> = (0..3u64)
                .map(|c| {
                    if trip == RoundTrip::Port && c == 2 {
                        return "-".to_string();
                    }
                    let base = 1000 * (10 * r as u64 + c + 1);
                    format!("{} / {}", base + 7, base + 3)
                })
                .collect();
            assert_eq!(cells, want, "{line}");
        }
        assert!(text.contains("qemu instructions: QEMU -icount shift=0,sleep=off"));
        // One emulator: its columns only.
        let qemu: Vec<Column> = COLUMNS
            .into_iter()
            .filter(|c| c.emu == Emulator::Qemu)
            .collect();
        assert!(!all_table(&qemu, &all_figures()).contains("bochs"));
    }

    #[test]
    fn json_has_a_result_for_every_cell() {
        let json: Value = serde_json::from_str(&all_json(&COLUMNS, &all_figures())).unwrap();
        assert_eq!(json["benchmark"], "all");
        let results = json["results"].as_array().unwrap();
        assert_eq!(results.len(), 12);
        assert!(results.contains(&json!({
            "round_trip": "native", "label": "native <-> native IPC",
            "emulator": "qemu", "unit": "cycles",
            "median": 1007, "min": 1003, "count": 10000
        })));
        assert!(results.contains(&json!({
            "round_trip": "port", "label": "guest -> native, virtio port + VMM",
            "emulator": "bochs", "unit": "instructions",
            "median": null, "min": null, "count": null
        })));
        assert!(json["columns"].as_array().unwrap().contains(&json!({
            "emulator": "bochs", "unit": "instructions", "clock": "Bochs clock: sync=none"
        })));
        let empty: Value = serde_json::from_str(&all_json(&[], &[])).unwrap();
        assert_eq!(empty["results"], json!([]));
    }

    /// A small XML well-formedness check: tags nest and close, attribute
    /// quotes pair up, text holds no bare `<`, `>` or `&`.
    fn xml_well_formed(xml: &str) -> Result<(), String> {
        let mut open: Vec<&str> = Vec::new();
        let mut rest = xml;
        let entities = ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"];
        let check_text = |text: &str| -> Result<(), String> {
            if text.contains('>') {
                return Err(format!("bare > in {text:?}"));
            }
            for (at, _) in text.match_indices('&') {
                if !entities.iter().any(|e| text[at..].starts_with(e)) {
                    return Err(format!("bare & in {text:?}"));
                }
            }
            Ok(())
        };
        while let Some(start) = rest.find('<') {
            check_text(&rest[..start])?;
            let end = start + rest[start..].find('>').ok_or("unclosed tag")?;
            let tag = &rest[start + 1..end];
            if !tag.matches('"').count().is_multiple_of(2) || tag.contains('<') {
                return Err(format!("bad tag <{tag}>"));
            }
            if let Some(name) = tag.strip_prefix('/') {
                if open.pop() != Some(name) {
                    return Err(format!("</{name}> closes nothing open"));
                }
            } else if !tag.ends_with('/') {
                open.push(tag.split_whitespace().next().ok_or("empty tag")?);
            } else {
                let attrs = &tag[..tag.len() - 1];
                check_text(&attrs.replace('"', ""))?;
            }
            rest = &rest[end + 1..];
        }
        check_text(rest)?;
        match open.last() {
            Some(tag) => Err(format!("<{tag}> never closed")),
            None => Ok(()),
        }
    }

    #[test]
    fn the_xml_checker_catches_broken_documents() {
        assert!(xml_well_formed("<a x=\"1\"><b/>t &amp; u</a>").is_ok());
        for bad in [
            "<a>",
            "<a></b>",
            "</a>",
            "<a x=\"1></a>",
            "<a>x & y</a>",
            "<a>x > y</a>",
            "<a",
        ] {
            assert!(xml_well_formed(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn chart_is_well_formed_and_shows_every_figure() {
        let svg = all_svg(&COLUMNS, &all_figures());
        xml_well_formed(&svg).unwrap();
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
        for trip in RoundTrip::ALL {
            for line in trip.chart_label() {
                assert!(
                    svg.contains(&format!(">{}</text>", xml_text(line))),
                    "{line}"
                );
            }
        }
        for c in COLUMNS {
            assert!(svg.contains(&xml_text(&c.name())));
            assert!(svg.contains(c.color()));
        }
        // One bar and one minimum line per figure, the missing cell marked.
        let figures = all_figures();
        assert_eq!(svg.matches("<title>").count(), figures.len());
        assert_eq!(svg.matches("stroke-width=\"2\"").count(), figures.len());
        assert_eq!(svg.matches(">n/a</text>").count(), 1);
        for f in &figures {
            assert!(
                svg.contains(&format!(
                    ": median {}, min {}</title>",
                    f.measure.median, f.measure.min
                )),
                "{f:?}"
            );
        }
        assert!(svg.contains("native &lt;-&gt; native"));
        // Decades from 100 (1003 is too close to 1k to show as a bar) to
        // 100k on the axis, for values 1003..32007.
        for label in [">100</text>", ">1k</text>", ">10k</text>", ">100k</text>"] {
            assert!(svg.contains(label), "{label}");
        }
        assert!(!svg.contains(">10</text>") && !svg.contains(">1M</text>"));
        let empty = all_svg(&COLUMNS, &[]);
        xml_well_formed(&empty).unwrap();
        assert!(empty.contains(">no results</text>"));
    }

    #[test]
    fn bars_grow_with_their_median() {
        let svg = all_svg(&COLUMNS, &all_figures());
        // The rects with a title, in order: their heights.
        let heights: Vec<f64> = svg
            .split("<rect ")
            .filter(|r| r.contains("<title>"))
            .map(|r| {
                let (_, h) = r.split_once("height=\"").unwrap();
                h.split('"').next().unwrap().parse().unwrap()
            })
            .collect();
        let medians: Vec<u64> = RoundTrip::ALL
            .into_iter()
            .flat_map(|t| COLUMNS.map(|c| find(&all_figures(), t, c)))
            .flatten()
            .map(|m| m.median)
            .collect();
        assert_eq!(heights.len(), medians.len());
        for (a, b) in heights
            .iter()
            .zip(&medians)
            .zip(heights.iter().zip(&medians).skip(1))
        {
            assert_eq!(a.1 < b.1, a.0 < b.0, "{heights:?} for {medians:?}");
        }
        assert!(heights
            .iter()
            .all(|&h| h > 0.0 && h <= PLOT_BOTTOM - PLOT_TOP));
    }

    #[test]
    fn compact_numbers() {
        for (v, want) in [
            (0.0, "0"),
            (7.0, "7"),
            (999.0, "999"),
            (1000.0, "1k"),
            (1038.0, "1.04k"),
            (51688.0, "51.7k"),
            (100_000.0, "100k"),
            (1_250_000.0, "1.25M"),
            (3e9, "3G"),
        ] {
            assert_eq!(compact(v), want, "{v}");
        }
        assert_eq!(xml_text("a<b>&\"'"), "a&lt;b&gt;&amp;&quot;&apos;");
    }

    #[test]
    fn the_guest_benchmarks_ride_on_the_linux_test() {
        let linux = systest::TESTS
            .iter()
            .find(|t| t.name == LINUX_TEST)
            .unwrap();
        let test = with_benchmarks(linux).unwrap();
        assert_eq!(test.name, ALL_LINUX_TEST);
        assert_eq!(test.memory_mib, linux.memory_mib);
        assert_eq!(test.kernel_args, linux.kernel_args);
        assert_eq!(test.modules.len(), linux.modules.len());
        let args = guest_kernel_args(&test).unwrap();
        assert!(args.iter().any(|a| a == BENCH_ARG), "{args:?}");
        // Everything the `linux` test passes, still passed.
        for arg in guest_kernel_args(linux).unwrap() {
            assert!(args.contains(&arg), "{arg}");
        }
        for m in test.modules {
            let dir = match m.content {
                Content::Truncated { dir, .. }
                | Content::Text { dir, .. }
                | Content::Linux(LinuxFile::Disk { dir } | LinuxFile::Cmdline { dir, .. }) => dir,
                _ => continue,
            };
            assert_eq!(dir, ALL_LINUX_TEST, "{}", m.name);
        }
        // The benchmark lines, in order, right before `MOAT-INIT done`.
        let texts: Vec<&str> = test.expect.iter().map(|e| e.text).collect();
        let done = texts
            .iter()
            .position(|t| t.starts_with(linux::INIT_DONE))
            .unwrap();
        assert_eq!(
            texts[done - 3..done],
            [
                "MOAT-BENCH ipcbench: ",
                "MOAT-BENCH portbench: ",
                "MOAT-BENCH pingpong: "
            ]
        );
        assert_eq!(texts.len(), linux.expect.len() + 3);
        assert!(test.forbidden().contains(&"FAIL"));
        let serial = GUEST_LOG.replace("MOAT-BENCH pingpong: FAIL the child closed its end\n", "");
        let all: Vec<&str> = test.expected_on(Emulator::Qemu);
        let bench_lines: Vec<&str> = all
            .into_iter()
            .filter(|t| t.starts_with(GUEST_BENCH))
            .collect();
        assert!(systest::judge(&serial, &bench_lines, &[]).is_ok());
    }

    #[test]
    fn a_failed_check_does_not_stop_the_linux_boot() {
        let linux = systest::TESTS
            .iter()
            .find(|t| t.name == LINUX_TEST)
            .unwrap();
        assert!(linux.forbid.contains(&ANY_FAILURE));
        let job = |test: SysTest, linux| AllJob {
            test,
            column: COLUMNS[1],
            linux,
            serial: PathBuf::new(),
            launch: Launch::Qemu(Vec::new()),
        };
        let guest = job(with_benchmarks(linux).unwrap(), true);
        let failed = "MOAT-CHECK hvc0 FAIL no reply\n";
        assert!(!guest.decided(failed));
        // Not before the root task has torn the VMM down.
        assert!(!guest.decided(&format!("{failed}{GUEST_POWER_OFF}\n")));
        assert!(guest.decided(&format!(
            "{failed}{GUEST_POWER_OFF}\nroottask: component 'linux' finished\n"
        )));
        assert!(guest.decided("roottask: component 'linux' faulted: #PF\n"));
        assert!(guest.decided("KERNEL PANIC\n"));
        assert!(!guest.decided(GUEST_LOG));
        let native = job(
            SysTest {
                name: ALL_NATIVE_TEST,
                ..BENCH_IPC
            },
            false,
        );
        assert!(native.decided("ping: FAIL bad reply\n"));
        assert!(native.decided(NATIVE_LOG));
        assert!(!native.decided("bench ipc null median=1 min=1 iterations=1\n"));
    }

    #[test]
    fn init_runs_every_guest_tool_when_asked() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let init = fs::read_to_string(root.join(linux::INIT)).unwrap();
        let (_, block) = init
            .split_once("if [ \"$(arg bench)\" = 1 ]; then")
            .unwrap();
        let (block, _) = block.split_once("\nfi\n").unwrap();
        assert!(block.contains("echo \"MOAT-BENCH "));
        for tool in RoundTrip::ALL.into_iter().filter_map(|t| t.tool()) {
            assert!(
                block.contains(&format!("\"{tool} ")),
                "{tool} not run by /init"
            );
            assert!(linux::TOOLS.contains(&tool), "{tool} not in the initramfs");
        }
    }

    #[test]
    fn columns_set_the_emulators_clock() {
        let qemu_cycles = COLUMNS[0];
        assert_eq!(qemu_cycles.qemu_args(), &[] as &[&str]);
        assert_eq!(COLUMNS[1].qemu_args(), ICOUNT);
        assert!(COLUMNS
            .iter()
            .all(|c| c.emu != Emulator::Bochs || c.unit == Unit::Instructions));
        let native = SysTest {
            name: ALL_NATIVE_TEST,
            ..BENCH_IPC
        };
        assert!(native
            .expect
            .iter()
            .any(|e| e.text == format!("bench ipc {NATIVE_CASE} ")));
    }
}
