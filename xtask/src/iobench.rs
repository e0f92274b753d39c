//! `cargo xtask bench io`: disk and TCP figures of the Linux test guest
//! under Moat against the same kernel and initramfs booted directly by
//! QEMU with the same kind of virtio devices, in one run (QEMU only).
//!
//! Both boots run with `moat.iobench=PORT`: `/init` runs the guest tool
//! `iobench` (guests/tools) on a scratch disk, then serves TCP on PORT to
//! a peer in this process, which connects through QEMU's forwarded port.
//! Under Moat the disk is the block service's (QEMU's virtio-blk device,
//! the `blk` component, the VMM's virtio-blk) and the network the switch's
//! (QEMU's virtio-net on user networking, the `net` component, the VMM's
//! virtio-net); directly, the guest drives QEMU's virtio-blk-pci and
//! virtio-net-pci itself. QEMU runs with `-icount shift=0,sleep=on`: the
//! guest's clock advances one nanosecond per instruction while a CPU runs,
//! and idle time passes with the host's clock, as waits for the host's I/O
//! take. (Not `sleep=off`: there, while every CPU waits for the host, the
//! clock jumps to the next timer, so a wait becomes whole timer periods
//! and the block service's 5 s request timeout expired on an fsync the
//! host had nearly done: the figures did not repeat and runs failed.)
//! Prints a table, writes `target/bench/io.json` (docs/benchmarks.md).

use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::bench::{self, summarize, Exits, Summary, BENCH_DIR};
use crate::cli::BenchOpts;
use crate::emu::{self, Exit};
use crate::linux::{self, SerialClock, INIT_START};
use crate::systest::{self, Launch};
use crate::{build, image, setup, Context, Error, Result};

const IO: &str = "io";
/// The guest's TCP port (the configuration's `hostfwd` and `/init`'s
/// `moat.iobench=`).
pub const GUEST_PORT: u16 = 8080;
/// The scratch disks' size: the 64 MiB the guest writes, and room.
const DISK_BYTES: u64 = 128 << 20;
/// The guest's RAM, as the Moat configuration's default.
const GUEST_MIB: u32 = 256;

/// How the guest's clock passes while every CPU idles (QEMU's
/// `-icount shift=0,sleep=...`); while a CPU runs, 1 ns per instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Idle {
    /// `sleep=on`: with the host's clock (see the module's note on
    /// `sleep=off`).
    Real,
}

impl Idle {
    const RUN: [Idle; 1] = [Idle::Real];

    fn icount(self) -> &'static str {
        match self {
            Idle::Real => "shift=0,sleep=on",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Idle::Real => "sleep-on",
        }
    }

    fn meaning(self) -> &'static str {
        match self {
            Idle::Real => {
                "guest clock: 1 ns per instruction; idle time passes with the host's clock \
                 (waits for the host's I/O count as they take)"
            }
        }
    }
}
const TIMEOUT: Duration = Duration::from_secs(900);
/// How long the host's peer tries to reach the guest's listener.
const CONNECT_FOR: Duration = Duration::from_secs(60);
const PREFIX: &str = "iobench: ";
const DONE: &str = "MOAT-IOBENCH done";
const DISK_DONE: &str = "iobench: rand-read ";
const GUEST_STOPPED: &str = "vmm: guest stopped";

const METHOD: &str = "one boot direct then one under Moat, QEMU TCG with -icount \
shift=0,sleep=on (the guest's clock advances 1 ns per instruction while a CPU runs, idle \
time passes with the host's clock); the same bzImage, initramfs \
and kernel arguments \
(moat.iobench=8080), 256 MiB guest RAM, a fresh sparse 128 MiB raw image each; direct = QEMU \
boots Linux itself with virtio-blk-pci and virtio-net-pci (user networking, hostfwd); moat = \
the same QEMU devices driven by the blk and net components, the guest on the VMM's virtio-blk \
and virtio-net; guest figures from the guest tool iobench (CLOCK_MONOTONIC): seq = 64 MiB \
written (1 MiB O_DIRECT pwrite, then fsync) and read back (1 MiB O_DIRECT pread), 3 rounds, \
median and minimum of the round times; rand = 1000 4 KiB O_DIRECT preads at seeded page \
offsets in those 64 MiB after 10 untimed ones, one at a time, median and minimum; tcp = 8 MiB \
each way per round, 3 rounds, with a peer in xtask reached through QEMU's forwarded port: \
guest->host timed by the guest from its first write to the peer's one-byte acknowledgement, \
host->guest from its one-byte request to its last byte read, and by xtask with the host's \
clock (wall); ratio = moat / direct of the times (above 1: Moat is slower); exits = the VMM's \
count at power-off (boot, benchmark and power-off)";

// ---------------------------------------------------------------- the guest's lines

/// A figure measured in rounds, each a number of bytes in some time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Row {
    SeqWrite,
    SeqRead,
    TcpSend,
    TcpRecv,
}

impl Row {
    const ALL: [Row; 4] = [Row::SeqWrite, Row::SeqRead, Row::TcpSend, Row::TcpRecv];

    fn word(self) -> &'static str {
        match self {
            Row::SeqWrite => "seq-write",
            Row::SeqRead => "seq-read",
            Row::TcpSend => "tcp-send",
            Row::TcpRecv => "tcp-recv",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Row::SeqWrite => "disk seq write",
            Row::SeqRead => "disk seq read",
            Row::TcpSend => "tcp guest->host",
            Row::TcpRecv => "tcp host->guest",
        }
    }
}

/// One round of a [`Row`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Round {
    pub row: Row,
    pub round: u64,
    pub bytes: u64,
    pub ns: u64,
}

/// The random reads' summary line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Random {
    pub count: u64,
    pub bytes: u64,
    pub median_ns: u64,
    pub min_ns: u64,
}

/// The TCP listener's line: what the host's peer must do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listen {
    pub port: u16,
    pub rounds: u64,
    pub bytes: u64,
}

/// Everything the guest said, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuestLines {
    pub rounds: Vec<Round>,
    pub random: Option<Random>,
    pub listen: Option<Listen>,
    /// The text after each `iobench: FAIL`.
    pub failures: Vec<String>,
    pub done: bool,
}

impl GuestLines {
    /// The times of `row`'s rounds, in nanoseconds.
    pub fn times(&self, row: Row) -> Vec<u64> {
        self.rounds
            .iter()
            .filter(|r| r.row == row)
            .map(|r| r.ns)
            .collect()
    }

    /// The bytes of a round of `row` (all rounds move the same).
    pub fn bytes(&self, row: Row) -> Option<u64> {
        self.rounds.iter().find(|r| r.row == row).map(|r| r.bytes)
    }
}

/// The values of `keys` in a line's `key=value` words, all or nothing.
fn values(words: &str, keys: &[&str]) -> Option<Vec<u64>> {
    keys.iter()
        .map(|key| {
            words
                .split_whitespace()
                .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))?
                .parse()
                .ok()
        })
        .collect()
}

/// The complete lines of `serial` (a line still being written may end
/// mid-number).
fn complete_lines(serial: &str) -> impl Iterator<Item = &str> {
    serial
        .split_inclusive('\n')
        .filter_map(|l| l.strip_suffix('\n'))
        .map(|l| l.trim_end_matches('\r'))
}

/// The guest's `iobench:` lines (wherever they start on a console line:
/// kernel messages may come before them) and `/init`'s end.
pub fn parse_guest(serial: &str) -> GuestLines {
    let mut out = GuestLines::default();
    for line in complete_lines(serial) {
        if line.contains(DONE) {
            out.done = true;
        }
        let Some((_, rest)) = line.split_once(PREFIX) else {
            continue;
        };
        let (what, words) = rest.split_once(' ').unwrap_or((rest, ""));
        if what == "FAIL" {
            out.failures.push(words.to_string());
        } else if let Some(row) = Row::ALL.into_iter().find(|r| r.word() == what) {
            if let Some(v) = values(words, &["round", "bytes", "ns"]) {
                out.rounds.push(Round {
                    row,
                    round: v[0],
                    bytes: v[1],
                    ns: v[2],
                });
            }
        } else if what == "rand-read" {
            if let Some(v) = values(words, &["count", "bytes", "median_ns", "min_ns"]) {
                out.random = Some(Random {
                    count: v[0],
                    bytes: v[1],
                    median_ns: v[2],
                    min_ns: v[3],
                });
            }
        } else if what == "tcp-listen" {
            if let Some(v) = values(words, &["port", "rounds", "bytes"]) {
                out.listen = u16::try_from(v[0]).ok().map(|port| Listen {
                    port,
                    rounds: v[1],
                    bytes: v[2],
                });
            }
        }
    }
    out
}

// ---------------------------------------------------------------- the host's peer

/// What the host's peer measured, each round: guest->host and
/// host->guest, host nanoseconds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerTimes {
    pub send: Vec<u64>,
    pub recv: Vec<u64>,
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The guest's side of `iobench tcp`, from the host: per round, reads
/// `bytes` and acknowledges them, then waits for the guest's request and
/// sends `bytes`, waiting for the acknowledgement. Retries the connection
/// while the guest does not answer (QEMU accepts before the guest does).
pub fn host_peer(port: u16, listen: Listen) -> Result<PeerTimes, String> {
    let address = SocketAddr::from(([127, 0, 0, 1], port));
    let started = Instant::now();
    let mut last = String::from("no attempt");
    while started.elapsed() < CONNECT_FOR {
        match TcpStream::connect_timeout(&address, Duration::from_secs(5)) {
            Ok(stream) => match exchange(stream, listen) {
                Ok(times) => return Ok(times),
                // QEMU's forward took the connection, the guest refused it.
                Err(Failure::NoFirstByte(why)) => last = why,
                Err(Failure::Broken(why)) => return Err(why),
            },
            Err(e) => last = e.to_string(),
        }
        thread::sleep(Duration::from_millis(500));
    }
    Err(format!(
        "cannot reach the guest on 127.0.0.1:{port}: {last}"
    ))
}

enum Failure {
    NoFirstByte(String),
    Broken(String),
}

fn exchange(mut stream: TcpStream, listen: Listen) -> Result<PeerTimes, Failure> {
    let broken = |what: &str, e: std::io::Error| Failure::Broken(format!("{what}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(300)))
        .map_err(|e| broken("timeout", e))?;
    let _ = stream.set_nodelay(true);
    let mut times = PeerTimes::default();
    let mut buffer = vec![0u8; 64 * 1024];
    let data = vec![0xa5u8; 64 * 1024];
    for round in 1..=listen.rounds {
        let mut left = listen.bytes;
        let mut first = None;
        while left > 0 {
            let want = left.min(buffer.len() as u64) as usize;
            match stream.read(&mut buffer[..want]) {
                Ok(0) if first.is_none() && round == 1 => {
                    return Err(Failure::NoFirstByte("closed at once".into()))
                }
                Ok(0) => {
                    return Err(Failure::Broken(format!(
                        "round {round}: the guest closed with {left} bytes to come"
                    )))
                }
                Ok(n) => {
                    first.get_or_insert_with(Instant::now);
                    left -= n as u64;
                }
                Err(e) if first.is_none() && round == 1 => {
                    return Err(Failure::NoFirstByte(e.to_string()))
                }
                Err(e) => return Err(broken(&format!("round {round}: reading"), e)),
            }
        }
        stream
            .write_all(b"A")
            .map_err(|e| broken("acknowledging", e))?;
        times
            .send
            .push(nanos(first.map_or(Duration::ZERO, |f| f.elapsed())));

        let mut one = [0u8];
        stream
            .read_exact(&mut one)
            .map_err(|e| broken(&format!("round {round}: waiting for the request"), e))?;
        let start = Instant::now();
        let mut left = listen.bytes;
        while left > 0 {
            let n = left.min(data.len() as u64) as usize;
            stream
                .write_all(&data[..n])
                .map_err(|e| broken(&format!("round {round}: sending"), e))?;
            left -= n as u64;
        }
        stream.read_exact(&mut one).map_err(|e| {
            broken(
                &format!("round {round}: waiting for the acknowledgement"),
                e,
            )
        })?;
        times.recv.push(nanos(start.elapsed()));
    }
    Ok(times)
}

// ---------------------------------------------------------------- one boot

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Direct,
    Moat,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Moat => "moat",
        }
    }
}

/// What one boot gave.
#[derive(Debug, Default)]
pub struct BootResult {
    pub guest: GuestLines,
    pub peer: Option<Result<PeerTimes, String>>,
    /// Host seconds from QEMU's start to `/init`'s start, to the end of
    /// the disk figures, and to `/init`'s end.
    pub wall_init: Option<f64>,
    pub wall_disk: Option<f64>,
    pub wall_done: Option<f64>,
    pub exits: Option<Exits>,
    pub note: String,
}

impl BootResult {
    fn complete(&self) -> bool {
        self.guest.done
            && self.guest.failures.is_empty()
            && self.guest.random.is_some()
            && Row::ALL.iter().all(|&r| !self.guest.times(r).is_empty())
            && matches!(&self.peer, Some(Ok(p)) if !p.send.is_empty() && !p.recv.is_empty())
    }
}

fn run_boot(kind: Kind, args: &[String], serial: &Path) -> Result<BootResult> {
    emu::remove_stale(serial)?;
    let port = crate::net::forwarded_port(args)
        .ok_or_else(|| Error::Other("no forwarded port in QEMU's arguments".into()))?;
    let read = || {
        fs::read(serial)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    };
    let clock = SerialClock::start(serial, &[INIT_START, DISK_DONE, DONE]);
    let peer: Arc<Mutex<Option<Result<PeerTimes, String>>>> = Arc::default();
    let peer_started = std::cell::Cell::new(false);
    let finished = || {
        clock.poll();
        let text = read();
        if !peer_started.get() {
            if let Some(listen) = parse_guest(&text).listen {
                peer_started.set(true);
                let peer = Arc::clone(&peer);
                thread::spawn(move || {
                    let result = host_peer(port, listen);
                    *peer.lock().unwrap_or_else(PoisonError::into_inner) = Some(result);
                });
            }
        }
        match kind {
            Kind::Direct => text.contains(DONE),
            Kind::Moat => text.contains(GUEST_STOPPED),
        }
    };
    let output = serial.with_extension("out");
    let outcome = emu::run_qemu(args, Some(TIMEOUT), Some(&finished), &output)?;
    clock.poll();
    let text = read();
    // The peer ends with the guest's last acknowledgement, before `done`.
    let peer = peer.lock().unwrap_or_else(PoisonError::into_inner).take();
    let secs = |m: &str| clock.seen(m).map(|d| d.as_secs_f64());
    Ok(BootResult {
        guest: parse_guest(&text),
        peer,
        wall_init: secs(INIT_START),
        wall_disk: secs(DISK_DONE),
        wall_done: secs(DONE),
        exits: (kind == Kind::Moat)
            .then(|| bench::parse_exits(&text))
            .flatten(),
        note: match outcome.exit {
            Exit::Status(status) => emu::Emulator::Qemu.describe_exit(status),
            Exit::TimedOut => format!("timed out after {}", crate::util::secs(outcome.elapsed)),
            Exit::Decided => "stopped".to_string(),
        },
    })
}

/// A fresh sparse raw image of [`DISK_BYTES`].
fn scratch_disk(path: &Path) -> Result<()> {
    emu::remove_stale(path)?;
    let file = fs::File::create(path).context(|| format!("cannot create {}", path.display()))?;
    file.set_len(DISK_BYTES)
        .context(|| format!("cannot size {}", path.display()))
}

/// QEMU booting the guest itself with the same kinds of devices.
fn direct_args(guest: &linux::Guest, dir: &Path, serial: &Path) -> Result<Vec<String>> {
    let disk = dir.join("direct-disk.img");
    scratch_disk(&disk)?;
    let kernel_args: Vec<String> = linux::DIRECT_ARGS
        .iter()
        .map(|a| a.to_string())
        .chain([format!("moat.iobench={GUEST_PORT}")])
        .collect();
    let mut args = linux::direct_qemu_args(guest, &kernel_args, serial, GUEST_MIB);
    let plan = crate::config::DiskPlan {
        guest: "linux".into(),
        path: disk,
        size: DISK_BYTES,
        create: false,
        template: None,
    };
    args.extend(plan.qemu_args());
    // The directly booted guest takes the first guest address (/init's
    // default), as the first guest of a configuration does.
    args.extend(crate::net::qemu_args(&[(
        crate::config::GUEST_ADDRESS_FIRST,
        crate::net::Forward {
            host: crate::net::free_port()?,
            guest: GUEST_PORT,
        },
    )]));
    args.push("-no-reboot".into());
    Ok(args)
}

// ---------------------------------------------------------------- the run

/// `cargo xtask bench io`.
pub fn run(opts: &BenchOpts) -> Result<ExitCode> {
    if opts.emu == Some(emu::Emulator::Bochs) {
        println!(
            "bench io: QEMU only: the block and network services drive QEMU's virtio-pci \
             devices, which Bochs does not have"
        );
        return Ok(ExitCode::FAILURE);
    }
    setup::run()?;
    let artifacts = build::build_all()?;
    image::assemble(&artifacts)?;
    let guest = linux::build()?;
    let dir = Path::new(BENCH_DIR).join(IO);
    fs::create_dir_all(&dir).context(|| format!("cannot create {}", dir.display()))?;
    println!(
        "bench io: the Linux guest directly under QEMU, then under Moat, with -icount \
         shift=0,sleep=on (logs in {}/)",
        dir.display()
    );
    let mut modes = Vec::new();
    let mut complete = true;
    for idle in Idle::RUN {
        let mut results = Vec::new();
        for kind in [Kind::Direct, Kind::Moat] {
            let serial: PathBuf = dir.join(format!("{}-{}.log", kind.name(), idle.name()));
            let mut args = match kind {
                Kind::Direct => direct_args(&guest, &dir, &serial)?,
                Kind::Moat => {
                    let test = &systest::BENCH_IO;
                    let boot = systest::boot_spec(test, &artifacts)?;
                    match systest::prepare(test, emu::Emulator::Qemu, &boot, &serial)? {
                        Launch::Qemu(args) => args,
                        Launch::Bochs(_) => unreachable!("prepared for QEMU"),
                    }
                }
            };
            args.extend(["-icount".to_string(), idle.icount().to_string()]);
            let result = run_boot(kind, &args, &serial)?;
            println!(
                "{} io [{} {}]: {} figures, {}{} ({}; serial {})",
                if result.complete() { "ok  " } else { "FAIL" },
                kind.name(),
                idle.name(),
                result.guest.rounds.len() + usize::from(result.guest.random.is_some()),
                match &result.peer {
                    Some(Ok(_)) => "host peer ok".to_string(),
                    Some(Err(e)) => format!("host peer: {e}"),
                    None => "no host peer".to_string(),
                },
                result
                    .guest
                    .failures
                    .iter()
                    .map(|f| format!("; guest FAIL {f}"))
                    .collect::<String>(),
                result.note,
                serial.display()
            );
            complete &= result.complete();
            results.push(result);
        }
        let [direct, moat] = &results[..] else {
            unreachable!("two boots")
        };
        modes.push(Mode {
            idle,
            rows: rows(direct, moat),
            exits: moat.exits.clone(),
        });
    }
    for mode in &modes {
        print!("\n{}", table(mode));
    }
    let json_path = Path::new(BENCH_DIR).join(format!("{IO}.json"));
    fs::write(&json_path, to_json(&modes))
        .context(|| format!("cannot write {}", json_path.display()))?;
    println!("bench io: wrote {}", json_path.display());
    Ok(if complete {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The figures of one clock mode: a direct and a Moat boot.
pub struct Mode {
    pub idle: Idle,
    pub rows: Vec<Figure>,
    pub exits: Option<Exits>,
}

// ---------------------------------------------------------------- figures

/// How a row's figures read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// Times of moving `bytes`: shown as MiB/s.
    Throughput { bytes: u64 },
    /// Times of one request: shown in microseconds.
    Latency,
    /// Seconds of host time.
    Seconds,
}

/// One line of the table: medians and minimums of the times, in
/// nanoseconds (seconds for [`Unit::Seconds`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Figure {
    pub name: String,
    pub clock: &'static str,
    pub unit: Unit,
    pub direct: Option<Summary>,
    pub moat: Option<Summary>,
}

impl Figure {
    pub fn ratio(&self) -> Option<Summary> {
        self.moat?.ratio(self.direct?)
    }
}

fn times(ns: &[u64]) -> Option<Summary> {
    summarize(ns.iter().map(|&n| n as f64))
}

pub fn rows(direct: &BootResult, moat: &BootResult) -> Vec<Figure> {
    let mut out = Vec::new();
    for row in Row::ALL {
        let bytes = direct
            .guest
            .bytes(row)
            .or(moat.guest.bytes(row))
            .unwrap_or(0);
        out.push(Figure {
            name: row.label().into(),
            clock: "guest",
            unit: Unit::Throughput { bytes },
            direct: times(&direct.guest.times(row)),
            moat: times(&moat.guest.times(row)),
        });
        if matches!(row, Row::SeqRead) {
            let random = |b: &BootResult| {
                b.guest.random.map(|r| Summary {
                    median: r.median_ns as f64,
                    min: r.min_ns as f64,
                })
            };
            out.push(Figure {
                name: "disk 4 KiB random read".into(),
                clock: "guest",
                unit: Unit::Latency,
                direct: random(direct),
                moat: random(moat),
            });
        }
    }
    let peer = |b: &BootResult, send: bool| match &b.peer {
        Some(Ok(p)) => times(if send { &p.send } else { &p.recv }),
        _ => None,
    };
    for (row, send) in [(Row::TcpSend, true), (Row::TcpRecv, false)] {
        let bytes = direct
            .guest
            .bytes(row)
            .or(moat.guest.bytes(row))
            .unwrap_or(0);
        out.push(Figure {
            name: row.label().into(),
            clock: "host",
            unit: Unit::Throughput { bytes },
            direct: peer(direct, send),
            moat: peer(moat, send),
        });
    }
    let span = |b: &BootResult, to: Option<f64>| {
        let (from, to) = (b.wall_init?, to?);
        (to >= from).then_some(Summary {
            median: to - from,
            min: to - from,
        })
    };
    for (name, disk) in [("/init to disk figures", true), ("/init to done", false)] {
        let at = |b: &BootResult| if disk { b.wall_disk } else { b.wall_done };
        out.push(Figure {
            name: name.into(),
            clock: "host",
            unit: Unit::Seconds,
            direct: span(direct, at(direct)),
            moat: span(moat, at(moat)),
        });
    }
    out
}

/// A time shown in the row's unit.
fn shown(unit: Unit, v: f64) -> String {
    match unit {
        Unit::Throughput { bytes } if v > 0.0 => {
            format!("{:.1}", bytes as f64 / (1 << 20) as f64 / (v / 1e9))
        }
        Unit::Throughput { .. } => "-".into(),
        Unit::Latency => format!("{:.1}", v / 1e3),
        Unit::Seconds => format!("{v:.1}"),
    }
}

fn unit_name(unit: Unit) -> &'static str {
    match unit {
        Unit::Throughput { .. } => "MiB/s",
        Unit::Latency => "us",
        Unit::Seconds => "s",
    }
}

pub fn table(mode: &Mode) -> String {
    let (rows, exits) = (&mode.rows, mode.exits.as_ref());
    let cell = |f: &Figure, s: Option<Summary>| {
        s.map_or("-".into(), |s| {
            format!("{} ({})", shown(f.unit, s.median), shown(f.unit, s.min))
        })
    };
    let mut out = format!(
        "-icount {}: {}\n{:<24} {:<6} {:<6} {:>18} {:>18} {:>14}\n",
        mode.idle.icount(),
        mode.idle.meaning(),
        "figure",
        "clock",
        "unit",
        "direct med (best)",
        "moat med (best)",
        "time ratio"
    );
    for f in rows.iter() {
        let ratio = f
            .ratio()
            .map_or("-".into(), |r| format!("{:.2} ({:.2})", r.median, r.min));
        let _ = writeln!(
            out,
            "{:<24} {:<6} {:<6} {:>18} {:>18} {:>14}",
            f.name,
            f.clock,
            unit_name(f.unit),
            cell(f, f.direct),
            cell(f, f.moat),
            ratio
        );
    }
    out.push_str(
        "best = from the shortest time; time ratio = moat / direct of the median (and \
         minimum) times: above 1, Moat is slower\n",
    );
    if let Some(e) = exits {
        let reasons: Vec<String> = e
            .by_reason
            .iter()
            .map(|(n, c)| format!("{n} {c}"))
            .collect();
        let _ = writeln!(
            out,
            "VMM exits of the Moat boot, to power-off: {}: {}",
            e.total,
            reasons.join(" ")
        );
    }
    out
}

fn json_summary(s: Option<Summary>) -> Value {
    s.map_or(
        Value::Null,
        |s| json!({"median": (s.median * 1000.0).round() / 1000.0, "min": (s.min * 1000.0).round() / 1000.0}),
    )
}

fn mode_json(mode: &Mode) -> Value {
    let entries: Vec<Value> = mode
        .rows
        .iter()
        .map(|f| {
            let (unit, bytes) = match f.unit {
                Unit::Throughput { bytes } => ("ns", Some(bytes)),
                Unit::Latency => ("ns", None),
                Unit::Seconds => ("s", None),
            };
            let mut entry = json!({
                "figure": f.name,
                "clock": f.clock,
                "unit": unit,
                "direct": json_summary(f.direct),
                "moat": json_summary(f.moat),
                "ratio": json_summary(f.ratio()),
            });
            if let (Some(bytes), Value::Object(map)) = (bytes, &mut entry) {
                map.insert("bytes".into(), json!(bytes));
                let rate = |s: Option<Summary>| {
                    s.map_or(Value::Null, |s| {
                        let mib_s = |ns: f64| {
                            ((bytes as f64 / (1 << 20) as f64 / (ns / 1e9)) * 10.0).round() / 10.0
                        };
                        json!({"median": mib_s(s.median), "best": mib_s(s.min)})
                    })
                };
                map.insert(
                    "mib_per_s".into(),
                    json!({"direct": rate(f.direct), "moat": rate(f.moat)}),
                );
            }
            entry
        })
        .collect();
    let exits = mode.exits.as_ref().map_or(Value::Null, |e| {
        let mut map = serde_json::Map::new();
        map.insert("total".into(), json!(e.total));
        for (name, count) in &e.by_reason {
            map.insert(name.clone(), json!(count));
        }
        Value::Object(map)
    });
    json!({
        "icount": mode.idle.icount(),
        "clock": mode.idle.meaning(),
        "results": entries,
        "moat_exits": exits,
    })
}

pub fn to_json(modes: &[Mode]) -> String {
    bench::json_text(&json!({
        "benchmark": IO,
        "emulator": "qemu",
        "method": METHOD,
        "modes": modes.iter().map(mode_json).collect::<Vec<_>>(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERIAL: &str = "\
[    1.0] random: crng init done
MOAT-INIT start uptime=0.91
iobench: seq-write round=1 bytes=67108864 block=1048576 ns=2000000000
iobench: seq-read round=1 bytes=67108864 block=1048576 ns=1000000000
iobench: seq-write round=2 bytes=67108864 block=1048576 ns=1500000000
iobench: seq-read round=2 bytes=67108864 block=1048576 ns=500000000
iobench: rand-read count=1000 bytes=4096 median_ns=80000 min_ns=60000
iobench: tcp-listen port=8080 rounds=2 bytes=8388608
[    9.1] virtio_net virtio1: something iobench: tcp-send round=1 bytes=8388608 ns=400000000
iobench: tcp-recv round=1 bytes=8388608 ns=300000000
iobench: tcp-send round=2 bytes=8388608 ns=zz
iobench: tcp-recv round=2 bytes=8388608
MOAT-IOBENCH done
iobench: tcp-send round=3 bytes=8388608 ns=1";

    #[test]
    fn the_guest_lines_are_read() {
        let g = parse_guest(SERIAL);
        assert!(g.done);
        assert!(g.failures.is_empty());
        assert_eq!(g.times(Row::SeqWrite), [2_000_000_000, 1_500_000_000]);
        assert_eq!(g.times(Row::SeqRead), [1_000_000_000, 500_000_000]);
        assert_eq!(g.bytes(Row::SeqRead), Some(64 << 20));
        assert_eq!(
            g.random,
            Some(Random {
                count: 1000,
                bytes: 4096,
                median_ns: 80_000,
                min_ns: 60_000
            })
        );
        assert_eq!(
            g.listen,
            Some(Listen {
                port: 8080,
                rounds: 2,
                bytes: 8 << 20
            })
        );
        // After other text on its line; malformed and unfinished lines
        // are left out.
        assert_eq!(g.times(Row::TcpSend), [400_000_000]);
        assert_eq!(g.times(Row::TcpRecv), [300_000_000]);
    }

    #[test]
    fn failures_and_a_missing_end_are_seen() {
        let g = parse_guest("iobench: FAIL cannot open /dev/vda with O_DIRECT: x\n");
        assert_eq!(g.failures, ["cannot open /dev/vda with O_DIRECT: x"]);
        assert!(!g.done);
        assert_eq!(parse_guest(""), GuestLines::default());
        let g = parse_guest("iobench: tcp-listen port=70000 rounds=1 bytes=1\n");
        assert_eq!(g.listen, None, "not a port");
    }

    fn boot(serial: &str, peer: PeerTimes) -> BootResult {
        BootResult {
            guest: parse_guest(serial),
            peer: Some(Ok(peer)),
            wall_init: Some(1.0),
            wall_disk: Some(11.0),
            wall_done: Some(21.0),
            ..BootResult::default()
        }
    }

    #[test]
    fn rows_compare_moat_with_direct() {
        let direct = boot(
            SERIAL,
            PeerTimes {
                send: vec![100, 300, 200],
                recv: vec![50],
            },
        );
        let slower = SERIAL.replace("ns=1000000000", "ns=3000000000");
        let moat = boot(
            &slower,
            PeerTimes {
                send: vec![400],
                recv: vec![],
            },
        );
        assert!(
            direct.complete() && !moat.complete(),
            "moat: no host->guest"
        );
        let rows = rows(&direct, &moat);
        let names: Vec<&str> = rows.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "disk seq write",
                "disk seq read",
                "disk 4 KiB random read",
                "tcp guest->host",
                "tcp host->guest",
                "tcp guest->host",
                "tcp host->guest",
                "/init to disk figures",
                "/init to done"
            ]
        );
        let read = &rows[1];
        assert_eq!(read.unit, Unit::Throughput { bytes: 64 << 20 });
        // Rounds 1 s and 0.5 s directly; 3 s and 0.5 s under Moat: the
        // lower median of two is the shorter.
        assert_eq!(read.direct.unwrap().median, 5e8);
        assert_eq!(read.ratio().unwrap().median, 1.0);
        assert_eq!(rows[2].ratio().unwrap().median, 1.0);
        assert_eq!(rows[5].direct.unwrap().median, 200.0);
        assert_eq!(rows[5].ratio().unwrap().min, 4.0);
        assert_eq!(rows[6].ratio(), None);
        assert_eq!(rows[8].direct.unwrap().median, 20.0);
        let mode = Mode {
            idle: Idle::Real,
            rows,
            exits: None,
        };
        let text = table(&mode);
        assert!(text.starts_with("-icount shift=0,sleep=on: "), "{text}");
        let line = |name: &str| text.lines().find(|l| l.starts_with(name)).unwrap();
        let read = line("disk seq read");
        assert!(
            read.contains("MiB/s") && read.contains("128.0 (128.0)"),
            "{text}"
        );
        let random = line("disk 4 KiB random read");
        assert!(
            random.contains(" us ") && random.contains("80.0 (60.0)"),
            "{text}"
        );
        let json: Value = serde_json::from_str(&to_json(&[mode])).unwrap();
        let results = &json["modes"][0]["results"];
        assert_eq!(json["modes"][0]["icount"], "shift=0,sleep=on");
        assert_eq!(results[1]["mib_per_s"]["direct"]["median"], 128.0);
        assert_eq!(results[2]["unit"], "ns");
        assert_eq!(results[2]["direct"]["min"], 60000.0);
        assert_eq!(results[8]["unit"], "s");
    }

    #[test]
    fn latency_and_seconds_are_shown_in_their_units() {
        assert_eq!(shown(Unit::Latency, 81_234.0), "81.2");
        assert_eq!(shown(Unit::Seconds, 2.25), "2.2");
        assert_eq!(shown(Unit::Throughput { bytes: 1 << 20 }, 5e8), "2.0");
        assert_eq!(shown(Unit::Throughput { bytes: 1 << 20 }, 0.0), "-");
    }
}
