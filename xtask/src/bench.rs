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

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use crate::cli::BenchOpts;
use crate::cli::Benchmark;
use crate::emu::{self, BochsFiles, Emulator, Exit};
use crate::linux::{self, SerialClock, INIT_START};
use crate::systest::{self, Content, Launch, LinuxFile, SysTest, BENCH_EXITS, BENCH_IPC};
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
/// Linux several times instead ([`run_linux`]).
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
        Benchmark::Linux => return None,
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
        return run_linux(opts);
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

// ---------------------------------------------------------------- bench linux

const LINUX: &str = "linux";
/// The system test whose image the Moat boot is.
const LINUX_TEST: &str = "linux";
/// What the VMM prints at power-off, after its exit counts.
const GUEST_STOPPED: &str = "vmm: guest stopped";
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

fn json_number(v: Option<f64>) -> String {
    v.map_or("null".into(), |v| format!("{v:.3}"))
}

fn json_summary(s: Option<Summary>) -> String {
    s.map_or("null".into(), |s| {
        format!(
            "{{\"median\": {}, \"min\": {}}}",
            json_number(Some(s.median)),
            json_number(Some(s.min))
        )
    })
}

fn json_figures(f: Figures) -> String {
    format!(
        "\"wall\": {}, \"uptime\": {}",
        json_summary(f.wall),
        json_summary(f.uptime)
    )
}

fn json_exits(e: Option<&Exits>) -> String {
    e.map_or("null".into(), |e| {
        let fields: String = e
            .by_reason
            .iter()
            .map(|(n, c)| format!(", {}: {c}", json_string(n)))
            .collect();
        format!("{{\"total\": {}{fields}}}", e.total)
    })
}

fn json_samples(runs: &[BootRun]) -> String {
    let samples: Vec<String> = runs
        .iter()
        .map(|r| {
            let exits = r
                .exits
                .as_ref()
                .map_or(String::new(), |e| format!(", \"exits\": {}", e.total));
            format!(
                "{{\"wall\": {}, \"uptime\": {}{exits}}}",
                json_number(r.wall),
                json_number(r.uptime)
            )
        })
        .collect();
    format!("[{}]", samples.join(", "))
}

pub fn linux_json(results: &[LinuxResult]) -> String {
    let entries: Vec<String> = results
        .iter()
        .map(|r| {
            let direct = Figures::of(&r.direct);
            let moat = Figures::of(&r.moat);
            format!(
                "    {{\"emulator\": {}, \"runs\": {},\n      \
                 \"direct\": {{{}}},\n      \
                 \"moat\": {{{}, \"exits\": {}}},\n      \
                 \"ratio\": {{{}}},\n      \
                 \"samples\": {{\"direct\": {}, \"moat\": {}}}}}",
                json_string(r.emu.name()),
                r.direct.len().max(r.moat.len()),
                json_figures(direct),
                json_figures(moat),
                json_exits(r.median_exits()),
                json_figures(moat.ratio(direct)),
                json_samples(&r.direct),
                json_samples(&r.moat),
            )
        })
        .collect();
    format!(
        "{{\n  \"benchmark\": {},\n  \"unit\": {},\n  \"method\": {},\n  \"results\": [\n{}\n  ]\n}}\n",
        json_string(LINUX),
        json_string(LINUX_UNIT),
        json_string(LINUX_METHOD),
        entries.join(",\n")
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
        let json = linux_json(&[linux_result()]);
        for part in [
            "\"benchmark\": \"linux\"",
            "\"unit\": \"seconds\"",
            "\"direct\": {\"wall\": {\"median\": 100.000, \"min\": 100.000}, \"uptime\": {\"median\": 7.000, \"min\": 7.000}}",
            "\"exits\": {\"total\": 70, \"io\": 70}",
            "\"ratio\": {\"wall\": {\"median\": 2.400, \"min\": 2.400}",
            "{\"wall\": null, \"uptime\": null, \"exits\": 90}",
        ] {
            assert!(json.contains(part), "{part} not in\n{json}");
        }
        let empty = LinuxResult {
            direct: vec![],
            moat: vec![],
            ..linux_result()
        };
        let json = linux_json(&[empty]);
        assert!(json.contains("\"direct\": {\"wall\": null, \"uptime\": null}"));
        assert!(json.contains("\"exits\": null"));
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
}
