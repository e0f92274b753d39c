//! `cargo xtask soak`: the Linux guest under CPU, memory, disk, console
//! and modem-port load (its `/init` with `moat.soak=SECS`) beside the
//! native 1 ms modem for N minutes of guest time, and what that did to
//! the rest of the system: the modem's missed frames and worst jitter
//! while the load ran, stalls (gaps between the guest's heartbeats, by
//! the modem's clock), the VMM's exits by reason, and whether the kernel
//! got all its memory back at the end. A table on the terminal and
//! `target/bench/soak.json`. The system test `soak_short` judges the same
//! figures for one minute (docs/benchmarks.md, "The soak").

use std::fs;
use std::path::Path;
use std::process::ExitCode;

use serde_json::{json, Value};

use crate::bench::{self, Exits};
use crate::cli::SoakOpts;
use crate::demo::{self, Report};
use crate::emu::Emulator;
use crate::systest::{self, Part};
use crate::{build, image, setup, Context, Result};

pub const DEFAULT_MINUTES: u64 = 30;
pub const MAX_MINUTES: u64 = 24 * 60;
/// The guest prints a heartbeat every 5 s of its time (`SOAK_BEAT_SECS`
/// in guests/linux/init); a gap of three missing ones is a stall.
pub const STALL_SECS: f64 = 15.0;
/// The modem's summaries come every 1000 frames of 1 ms.
const SUMMARY_SECS: f64 = 1.0;
const FRAMES_PER_SEC: f64 = 1000.0;

const START: &str = "MOAT-SOAK start seconds=";
const DONE: &str = "MOAT-SOAK done";
const HEARTBEAT: &str = "stress: heartbeat ";
const MEMORY_FREE: &str = "all its memory is free again";
const LEAKED: &str = "frames leaked";

/// What the modem's worst jitter may be, per emulator. A frame the modem
/// wakes for after the next one was due is missed: no frame may be. On
/// QEMU with `-icount` the host's load cannot make the modem late, so its
/// lateness is the longest stretch the kernel kept it from running (the
/// guest's exit to the kernel, the kernel's paths); the demo measures
/// 5-30 us there. A quarter of the frame leaves three quarters for the
/// modem's own work, with about ten times the measured margin. Bochs'
/// timer is coarser (its demo shows 490-570 us): no missed frame only.
pub fn jitter_limit_us(emu: Emulator) -> f64 {
    match emu {
        Emulator::Qemu => 250.0,
        Emulator::Bochs => 1000.0,
    }
}

/// The kernel's account of its memory at the end.
#[derive(Clone, Debug, PartialEq)]
pub enum Memory {
    Free,
    /// The kernel's line.
    Leaked(String),
    /// The run ended before the kernel said.
    Unknown,
}

/// One soak's figures, from its serial output.
#[derive(Clone, Debug, PartialEq)]
pub struct Figures {
    /// Guest seconds of load asked for (the start line).
    pub seconds: u64,
    /// The guest's `MOAT-SOAK done` line came.
    pub finished: bool,
    /// The modem between the start and the end of the load: its
    /// summaries, the frames they cover, missed frames, worst jitter.
    pub summaries: usize,
    pub frames: u64,
    pub missed: u64,
    pub worst_jitter_us: f64,
    pub heartbeats: usize,
    /// The longest gap between two signs of life of the guest (its start
    /// line, its heartbeats, its done line or, without one, the end of the
    /// output), by the modem's clock, in seconds (±1 s: the modem reports
    /// once a second).
    pub longest_gap_secs: f64,
    /// Gaps longer than [`STALL_SECS`].
    pub stalls: usize,
    /// The longest gap between heartbeats by the guest's own clock.
    pub longest_guest_gap_secs: u64,
    pub exits: Option<Exits>,
    pub memory: Memory,
}

/// Where `needle` first starts in `serial`.
fn position(serial: &str, needle: &str) -> Option<usize> {
    serial.find(needle)
}

/// The frames a run of summaries covers (each reports 1000).
fn span_frames(window: &[Report]) -> u64 {
    match (window.first(), window.last()) {
        (Some(first), Some(last)) => last.frames.saturating_sub(first.frames) + 1000,
        _ => 0,
    }
}

/// The frames the modem had counted by `at` (its last summary before).
fn frames_at(reports: &[Report], at: usize) -> u64 {
    reports
        .iter()
        .take_while(|r| r.at < at)
        .last()
        .map_or(0, |r| r.frames)
}

/// The elapsed seconds of each complete heartbeat line, and where it is.
fn heartbeats(serial: &str) -> Vec<(usize, u64)> {
    serial
        .match_indices(HEARTBEAT)
        .filter_map(|(at, _)| {
            let line = serial[at + HEARTBEAT.len()..].split_once('\n')?.0;
            let secs = line.split_once(" s,")?.0.parse().ok()?;
            Some((at, secs))
        })
        .collect()
}

/// The figures of a soak's output; `None` if the load never started.
pub fn figures(serial: &str) -> Option<Figures> {
    let start = position(serial, START)?;
    let seconds = serial[start + START.len()..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    let done = serial[start..].find(DONE).map(|at| start + at);
    let end = done.unwrap_or(serial.len());
    let reports = demo::reports(serial);
    let window = demo::covering(&reports, start, end);
    let beats: Vec<(usize, u64)> = heartbeats(serial)
        .into_iter()
        .filter(|&(at, _)| at > start && at < end)
        .collect();
    let mut signs: Vec<usize> = vec![start];
    signs.extend(beats.iter().map(|&(at, _)| at));
    signs.push(end);
    let gaps: Vec<f64> = signs
        .windows(2)
        .map(|w| {
            let frames = frames_at(&reports, w[1]).saturating_sub(frames_at(&reports, w[0]));
            frames as f64 / FRAMES_PER_SEC
        })
        .collect();
    let memory = if let Some(at) = serial.find(LEAKED) {
        let line_start = serial[..at].rfind('\n').map_or(0, |n| n + 1);
        let line = serial[line_start..].lines().next().unwrap_or_default();
        Memory::Leaked(line.trim_end_matches('\r').to_string())
    } else if serial.contains(MEMORY_FREE) {
        Memory::Free
    } else {
        Memory::Unknown
    };
    Some(Figures {
        seconds,
        finished: done.is_some(),
        summaries: window.len(),
        frames: span_frames(&window),
        missed: window.iter().map(|r| r.last_missed).sum(),
        worst_jitter_us: window.iter().map(|r| r.last_worst_us).fold(0.0, f64::max),
        heartbeats: beats.len(),
        longest_gap_secs: gaps.iter().copied().fold(0.0, f64::max),
        stalls: gaps.iter().filter(|&&g| g > STALL_SECS).count(),
        longest_guest_gap_secs: beats
            .windows(2)
            .map(|w| w[1].1.saturating_sub(w[0].1))
            .max()
            .unwrap_or(0),
        exits: bench::parse_exits(serial),
        memory,
    })
}

/// The judgement of a soak's figures, one part each: the modem's
/// deadlines, stalls, the VMM's exits, the memory.
pub fn judge(serial: &str, emu: Emulator) -> Vec<Part> {
    let Some(f) = figures(serial) else {
        return vec![Part {
            name: "load".into(),
            result: Err(format!("no `{START}` line: the load never started")),
        }];
    };
    // Every second of load has its summary, but for the ones cut at
    // either end.
    let want_summaries = (f.seconds as f64 / SUMMARY_SECS) as usize - 2;
    let modem = judge_modem(
        f.summaries,
        f.frames,
        f.missed,
        f.worst_jitter_us,
        want_summaries,
        emu,
    );
    let want_beats = (f.seconds / 5).saturating_sub(1) as usize;
    let stalls = format!(
        "{} heartbeats, longest gap {:.0} s by the modem's clock ({} s by the guest's), \
         {} gaps over {STALL_SECS} s",
        f.heartbeats, f.longest_gap_secs, f.longest_guest_gap_secs, f.stalls
    );
    let stalls = if !f.finished {
        Err(format!("the load did not finish (no `{DONE}`): {stalls}"))
    } else if f.stalls > 0 || f.heartbeats < want_beats {
        Err(format!("{stalls}; want at least {want_beats} heartbeats"))
    } else {
        Ok(stalls)
    };
    let exits = match &f.exits {
        Some(e) => Ok(exits_text(e)),
        None => Err("no `vmm: exits` line".to_string()),
    };
    let memory = match &f.memory {
        Memory::Free => Ok("the kernel got all its memory back".to_string()),
        Memory::Leaked(line) => Err(line.clone()),
        Memory::Unknown => Err("the kernel never said whether its memory is free".to_string()),
    };
    [
        ("modem", modem),
        ("stalls", stalls),
        ("exits", exits),
        ("memory", memory),
    ]
    .into_iter()
    .map(|(name, result)| Part {
        name: name.to_string(),
        result,
    })
    .collect()
}

/// The modem's deadlines over a stretch of a run: at least `want`
/// summaries (it ran throughout), no missed frame, the worst jitter
/// within [`jitter_limit_us`].
pub fn judge_modem(
    summaries: usize,
    frames: u64,
    missed: u64,
    worst_us: f64,
    want: usize,
    emu: Emulator,
) -> std::result::Result<String, String> {
    let limit = jitter_limit_us(emu);
    let text = format!(
        "{summaries} summaries, frames {frames}, missed {missed}, worst jitter {worst_us:.3} us \
         (limit {limit} us)"
    );
    if summaries >= want && missed == 0 && worst_us <= limit {
        Ok(text)
    } else {
        Err(format!("{text}; want at least {want} summaries"))
    }
}

/// The modem over the summaries after `from` up to the first after `to`.
pub fn judge_modem_between(
    serial: &str,
    from: usize,
    to: usize,
    want: usize,
    emu: Emulator,
) -> std::result::Result<String, String> {
    let window = demo::covering(&demo::reports(serial), from, to);
    let frames = span_frames(&window);
    judge_modem(
        window.len(),
        frames,
        window.iter().map(|r| r.last_missed).sum(),
        window.iter().map(|r| r.last_worst_us).fold(0.0, f64::max),
        want,
        emu,
    )
}

/// For the system test `soak_short` (QEMU).
pub fn check_short(serial: &str) -> Vec<Part> {
    judge(serial, Emulator::Qemu)
}

fn exits_text(e: &Exits) -> String {
    let reasons: Vec<String> = e
        .by_reason
        .iter()
        .map(|(name, count)| format!("{name} {count}"))
        .collect();
    format!("{} ({})", e.total, reasons.join(", "))
}

/// The table printed at the end.
pub fn table(emu: Emulator, f: &Figures) -> String {
    let rows = [
        ("guest time under load", format!("{} s", f.seconds)),
        (
            "load finished",
            if f.finished { "yes" } else { "no" }.to_string(),
        ),
        (
            "modem frames (summaries)",
            format!("{} ({})", f.frames, f.summaries),
        ),
        ("modem missed frames", f.missed.to_string()),
        ("modem worst jitter", format!("{:.3} us", f.worst_jitter_us)),
        ("heartbeats", f.heartbeats.to_string()),
        (
            "longest gap (modem / guest clock)",
            format!(
                "{:.0} s / {} s",
                f.longest_gap_secs, f.longest_guest_gap_secs
            ),
        ),
        ("stalls (gaps over 15 s)", f.stalls.to_string()),
        (
            "VM exits",
            f.exits.as_ref().map_or("-".to_string(), exits_text),
        ),
        (
            "memory at the end",
            match &f.memory {
                Memory::Free => "all free again".to_string(),
                Memory::Leaked(line) => line.clone(),
                Memory::Unknown => "-".to_string(),
            },
        ),
    ];
    let mut out = format!("soak on {}:\n", emu.name());
    for (name, value) in rows {
        out += &format!("  {name:<36} {value}\n");
    }
    out
}

/// `target/bench/soak.json`.
pub fn to_json(emu: Emulator, f: &Figures, parts: &[Part]) -> Value {
    let exits = f.exits.as_ref().map(|e| {
        let reasons: serde_json::Map<String, Value> = e
            .by_reason
            .iter()
            .map(|(name, count)| (name.clone(), json!(count)))
            .collect();
        json!({"total": e.total, "by_reason": reasons})
    });
    let verdicts: serde_json::Map<String, Value> = parts
        .iter()
        .map(|p| {
            let (ok, text) = match &p.result {
                Ok(text) => (true, text),
                Err(text) => (false, text),
            };
            (p.name.clone(), json!({"passed": ok, "detail": text}))
        })
        .collect();
    json!({
        "benchmark": "soak",
        "emulator": emu.name(),
        "clock": match emu {
            Emulator::Qemu => "QEMU -icount shift=0,sleep=off: guest time counts instructions",
            Emulator::Bochs => "Bochs clock: sync=none: guest time counts instructions",
        },
        "guest_seconds": f.seconds,
        "finished": f.finished,
        "modem": {
            "summaries": f.summaries,
            "frames": f.frames,
            "missed": f.missed,
            "worst_jitter_us": f.worst_jitter_us,
            "jitter_limit_us": jitter_limit_us(emu),
        },
        "heartbeats": f.heartbeats,
        "longest_gap_seconds": f.longest_gap_secs,
        "longest_guest_gap_seconds": f.longest_guest_gap_secs,
        "stall_threshold_seconds": STALL_SECS,
        "stalls": f.stalls,
        "exits": exits,
        "memory": match &f.memory {
            Memory::Free => "free",
            Memory::Leaked(_) => "leaked",
            Memory::Unknown => "unknown",
        },
        "verdicts": verdicts,
    })
}

/// `cargo xtask soak [--emu qemu|bochs] [--minutes N]`.
pub fn run(opts: &SoakOpts) -> Result<ExitCode> {
    let secs = opts.minutes * 60;
    let test: &'static systest::SysTest = Box::leak(Box::new(systest::soak(secs)));
    setup::run()?;
    let artifacts = build::build_all()?;
    image::assemble(&artifacts)?;
    println!(
        "soak: {} min of guest time on {}; output in {}/{}-{}.log",
        opts.minutes,
        opts.emu.name(),
        systest::SYSTEST_DIR,
        test.name,
        opts.emu.name()
    );
    let results = systest::run_all(&[test], &[opts.emu], &artifacts)?;
    let Some(result) = results.first() else {
        return Ok(ExitCode::FAILURE);
    };
    let serial = fs::read(&result.serial)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let parts = judge(&serial, opts.emu);
    let Some(f) = figures(&serial) else {
        println!(
            "soak: the load never started; see {}",
            result.serial.display()
        );
        return Ok(ExitCode::FAILURE);
    };
    print!("\n{}", table(opts.emu, &f));
    let dir = Path::new(bench::BENCH_DIR);
    fs::create_dir_all(dir).context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join("soak.json");
    let text = bench::json_text(&to_json(opts.emu, &f, &parts));
    fs::write(&path, text).context(|| format!("cannot write {}", path.display()))?;
    println!("soak: wrote {}", path.display());
    Ok(if result.passed && parts.iter().all(|p| p.result.is_ok()) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(frames: u64, last_missed: u64, worst: &str) -> String {
        format!(
            "modem: frames {frames}, missed {last_missed}, worst jitter 9.000 us; last 1000: missed {last_missed}, worst {worst} us\r\n"
        )
    }

    /// A soak of `secs` seconds with a heartbeat every 5 and a summary
    /// every second, the modem at `worst` us throughout.
    fn run_of(secs: u64, worst: &str) -> String {
        let mut s = String::from("modem: serving, frame 1 ms\n");
        s += &summary(1000, 0, "3.000");
        s += &format!("MOAT-SOAK start seconds={secs}\n");
        for t in 1..=secs {
            s += &summary((t + 1) * 1000, 0, worst);
            if t % 5 == 0 && t < secs {
                s += &format!(
                    "stress: heartbeat {t} s, {} cpu rounds, 3 memory passes\n",
                    t * 10
                );
            }
            s += "MOAT-SOAK io: console line 1 of the I/O load\n";
        }
        s += "stress: done, 600 cpu rounds, 30 memory passes of 32 MiB\n";
        s += "MOAT-SOAK done seconds=60, at: 50 ok, 0 failed\n";
        s += "vmm: exits 1000: io 900 mmio 50 hlt 50\n";
        s += "[INFO  cpu0] task 'roottask': all its memory is free again\n";
        s
    }

    fn verdicts(serial: &str) -> Vec<(String, bool)> {
        judge(serial, Emulator::Qemu)
            .into_iter()
            .map(|p| (p.name, p.result.is_ok()))
            .collect()
    }

    #[test]
    fn a_good_soak_passes_with_its_figures() {
        let serial = run_of(60, "12.500");
        let f = figures(&serial).unwrap();
        assert_eq!((f.seconds, f.finished, f.heartbeats), (60, true, 11));
        assert_eq!((f.missed, f.stalls, f.longest_guest_gap_secs), (0, 0, 5));
        assert!((f.worst_jitter_us - 12.5).abs() < 1e-9);
        assert!((f.longest_gap_secs - 5.0).abs() < 1e-9, "{f:?}");
        assert_eq!(f.exits.as_ref().map(|e| e.total), Some(1000));
        assert_eq!(f.memory, Memory::Free);
        assert!(
            verdicts(&serial).iter().all(|(_, ok)| *ok),
            "{:?}",
            judge(&serial, Emulator::Qemu)
                .iter()
                .map(|p| &p.result)
                .collect::<Vec<_>>()
        );
        let json = to_json(Emulator::Qemu, &f, &judge(&serial, Emulator::Qemu));
        assert_eq!(json["modem"]["missed"], 0);
        assert_eq!(json["exits"]["by_reason"]["io"], 900);
        assert_eq!(json["verdicts"]["memory"]["passed"], true);
        assert!(table(Emulator::Qemu, &f).contains("modem worst jitter"));
    }

    #[test]
    fn a_missed_frame_or_late_modem_fails_the_modem_part() {
        let serial = run_of(60, "12.500").replacen(
            &summary(30_000, 0, "12.500"),
            &summary(30_000, 2, "1500.000"),
            1,
        );
        assert_eq!(verdicts(&serial)[0], ("modem".to_string(), false));
        let late = run_of(60, "300.000");
        assert_eq!(verdicts(&late)[0], ("modem".to_string(), false));
        let bochs = judge(&late, Emulator::Bochs);
        assert!(bochs[0].result.is_ok(), "Bochs allows 1000 us");
        // A modem that stops reporting during the load.
        let silent: String = run_of(60, "1.000")
            .lines()
            .filter(|l| !l.starts_with("modem: frames 4") && !l.starts_with("modem: frames 5"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(verdicts(&silent)[0], ("modem".to_string(), false));
    }

    #[test]
    fn missing_heartbeats_are_a_stall() {
        let serial: String = run_of(60, "1.000")
            .lines()
            .filter(|l| {
                !l.contains("heartbeat 20 s")
                    && !l.contains("heartbeat 25 s")
                    && !l.contains("heartbeat 30 s")
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let f = figures(&serial).unwrap();
        assert_eq!(f.stalls, 1);
        assert!((f.longest_gap_secs - 20.0).abs() < 1e-9, "{f:?}");
        assert_eq!(verdicts(&serial)[1], ("stalls".to_string(), false));
        // Two missing heartbeats are not yet one.
        let serial: String = run_of(60, "1.000")
            .lines()
            .filter(|l| !l.contains("heartbeat 20 s") && !l.contains("heartbeat 25 s"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(figures(&serial).unwrap().stalls, 0);
    }

    #[test]
    fn a_guest_that_stops_is_a_stall_to_the_end() {
        let full = run_of(60, "1.000");
        let cut = full.find("stress: heartbeat 30 s").unwrap();
        let mut serial = full[..cut].to_string();
        for t in 31..=60 {
            serial += &summary(t * 1000, 0, "1.000");
        }
        let f = figures(&serial).unwrap();
        assert!(!f.finished && f.stalls == 1, "{f:?}");
        assert_eq!(f.memory, Memory::Unknown);
        let v = verdicts(&serial);
        assert!(!v[1].1 && !v[2].1 && !v[3].1, "{v:?}");
    }

    #[test]
    fn leaked_memory_fails_and_shows_the_kernels_line() {
        let serial = run_of(60, "1.000").replace(
            "task 'roottask': all its memory is free again",
            "task 'roottask': 3 frames leaked",
        );
        let f = figures(&serial).unwrap();
        assert_eq!(
            f.memory,
            Memory::Leaked("[INFO  cpu0] task 'roottask': 3 frames leaked".into())
        );
        assert_eq!(verdicts(&serial)[3], ("memory".to_string(), false));
    }

    #[test]
    fn no_start_line_is_one_failed_part() {
        let parts = judge("modem: serving\n", Emulator::Qemu);
        assert_eq!(parts.len(), 1);
        assert!(parts[0].result.is_err());
    }
}
