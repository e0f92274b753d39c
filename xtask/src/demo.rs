//! `cargo xtask demo modem`: the modem / application-processor separation
//! demo. One boot of the demo image (manifest [`crate::manifests::DEMO`],
//! the Linux guest with `moat.demo=1`) plays steps a–e; this module judges
//! each step from the system's own lines — the guest's `MOAT-DEMO` lines
//! for what Linux saw, the modem's frame summaries, the root task's and
//! the VMM's lines for what happened on the host — and prints one verdict
//! per step. The `demo` system test judges the same way on both emulators.

use std::fs;
use std::process::ExitCode;

use crate::cli::DemoOpts;
use crate::emu::Emulator;
use crate::{build, image, setup, systest, Result};

/// The steps, as the issue names them.
pub const STEPS: [(char, &str); 5] = [
    ('a', "Linux sends AT commands and an SMS"),
    (
        'b',
        "under Linux CPU + memory + I/O load the modem misses no deadline",
    ),
    (
        'c',
        "Linux panics: the modem ticks on, the VMM restarts Linux, it reconnects",
    ),
    (
        'd',
        "the modem crashes: the root task restarts it, Linux sees the port reset and reconnects",
    ),
    (
        'e',
        "root in Linux calls portals it was not given and reads memory outside its RAM: all refused",
    ),
];

const SMS_LOGGED: &str = "modem: SMS to 5550100: hello from the demo";
const LOAD_START: &str = "MOAT-DEMO b load start";
const LOAD_END: &str = "MOAT-DEMO b load end";
const PANICKING: &str = "MOAT-DEMO c panicking on purpose";
const VMM_RESTARTS: &str = "vmm: guest kernel panic (pvpanic): restarting the guest";
const CRASHING_MODEM: &str = "MOAT-DEMO d crashing the modem";
const MODEM_CRASH: &str = "modem: crashing on purpose (AT+MOATFAULT)";
const MODEM_RESTARTED: &str = "roottask: component 'modem' restarted";
const PORT_CLOSED: &str = "vmm: port `modem`: the modem is gone, closed";
const PORT_OPEN: &str = "vmm: port `modem`: the modem answers, open again";
const MODEM_SERVING: &str = "modem: serving";
const REPORT: &str = "modem: frames ";

/// One step's outcome: what was shown, or why it failed.
#[derive(Debug, PartialEq)]
pub struct Verdict {
    pub step: char,
    pub title: &'static str,
    pub result: std::result::Result<String, String>,
}

/// One of the modem's frame summaries:
/// `modem: frames F, missed M, worst jitter X us; last N: missed m, worst w us`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Report {
    /// Where in the output it starts.
    pub at: usize,
    pub frames: u64,
    pub missed: u64,
    /// Missed frames and worst lateness (µs) since the summary before.
    pub last_missed: u64,
    pub last_worst_us: f64,
}

/// Every complete frame summary in `serial`.
pub fn reports(serial: &str) -> Vec<Report> {
    serial
        .match_indices(REPORT)
        .filter_map(|(at, _)| {
            let line = serial[at..].lines().next()?;
            let rest = line.strip_prefix(REPORT)?;
            let (frames, rest) = rest.split_once(", missed ")?;
            let (missed, rest) = rest.split_once(", worst jitter ")?;
            let (_, last) = rest.split_once("; last ")?;
            let (_, last) = last.split_once(": missed ")?;
            let (last_missed, last) = last.split_once(", worst ")?;
            let last_worst = last.strip_suffix(" us")?;
            Some(Report {
                at,
                frames: frames.parse().ok()?,
                missed: missed.parse().ok()?,
                last_missed: last_missed.parse().ok()?,
                last_worst_us: last_worst.trim_end_matches('\r').parse().ok()?,
            })
        })
        .collect()
}

/// The rest of the line that starts with `prefix` (its first occurrence
/// at or after `from`), and where it is.
fn line_after<'a>(serial: &'a str, from: usize, prefix: &str) -> Option<(usize, &'a str)> {
    let at = from + serial.get(from..)?.find(prefix)?;
    let rest = serial[at + prefix.len()..].lines().next().unwrap_or("");
    Some((at, rest.trim_end_matches('\r')))
}

/// `needles` in this order from `from`; the position after the last one,
/// or which one is missing.
fn in_order(serial: &str, from: usize, needles: &[&str]) -> std::result::Result<usize, String> {
    let mut pos = from;
    for needle in needles {
        match serial.get(pos..).and_then(|rest| rest.find(needle)) {
            Some(at) => pos += at + needle.len(),
            None => return Err(format!("no {needle:?}")),
        }
    }
    Ok(pos)
}

/// The guest's own verdict line for `step`: its detail if `ok`.
fn guest_line(serial: &str, step: char) -> std::result::Result<(usize, String), String> {
    let prefix = format!("MOAT-DEMO {step} ");
    let mut from = 0;
    while let Some((at, rest)) = line_after(serial, from, &prefix) {
        if let Some(detail) = rest.strip_prefix("ok") {
            return Ok((at, detail.trim().to_string()));
        }
        if let Some(detail) = rest.strip_prefix("FAIL") {
            return Err(format!("the guest says: {}", detail.trim()));
        }
        from = at + prefix.len();
    }
    Err(format!("no `MOAT-DEMO {step} ok` line from the guest"))
}

/// The summaries after `from` up to and including the first one after
/// `to`: every frame released in between is counted in one of them.
pub fn covering(reports: &[Report], from: usize, to: usize) -> Vec<Report> {
    let mut out = Vec::new();
    for r in reports.iter().filter(|r| r.at > from) {
        out.push(*r);
        if r.at > to {
            break;
        }
    }
    out
}

/// Missed frames and worst jitter over `window`, as a sentence; an error
/// if any frame was missed or the window is too short to say.
fn judge_ticks(window: &[Report], min: usize, what: &str) -> std::result::Result<String, String> {
    let missed: u64 = window.iter().map(|r| r.last_missed).sum();
    let worst = window.iter().map(|r| r.last_worst_us).fold(0.0, f64::max);
    let (first, last) = match (window.first(), window.last()) {
        (Some(first), Some(last)) if window.len() >= min => (first, last),
        _ => {
            return Err(format!(
                "{} frame summaries of the modem {what}, want at least {min}",
                window.len()
            ))
        }
    };
    let text = format!(
        "{what}: frames {}..{}, missed {missed}, worst jitter {worst:.3} us",
        first.frames, last.frames
    );
    if missed == 0 {
        Ok(text)
    } else {
        Err(text)
    }
}

fn step_a(serial: &str) -> std::result::Result<String, String> {
    let (at, detail) = guest_line(serial, 'a')?;
    in_order(serial, 0, &[SMS_LOGGED]).map_err(|e| format!("the modem logged {e}"))?;
    let _ = at;
    Ok(format!("{detail}; the modem logged the SMS"))
}

fn step_b(serial: &str, reports: &[Report]) -> std::result::Result<String, String> {
    let start = in_order(serial, 0, &[LOAD_START])?;
    let end = in_order(serial, start, &[LOAD_END])?;
    let (_, load) = guest_line(serial, 'b')?;
    // The load runs 5 s of guest time: at least 3 whole 1 s summaries.
    let ticks = judge_ticks(&covering(reports, start, end), 4, "under load")?;
    Ok(format!("{ticks} ({load})"))
}

fn step_c(serial: &str, reports: &[Report]) -> std::result::Result<String, String> {
    let panic = in_order(serial, 0, &[PANICKING])?;
    let restart = in_order(serial, panic, &[VMM_RESTARTS])?;
    let (back, detail) = guest_line(serial, 'c')?;
    if back < restart {
        return Err("the guest's step c line comes before the VMM restarted it".into());
    }
    // Only summaries before the guest's line: step d crashes the modem
    // soon after, and the next summary may be the new instance's.
    let window: Vec<Report> = reports
        .iter()
        .filter(|r| r.at > panic && r.at < back)
        .copied()
        .collect();
    let ticks = judge_ticks(&window, 2, "while Linux restarted")?;
    Ok(format!("{ticks}; {detail}"))
}

fn step_d(serial: &str) -> std::result::Result<String, String> {
    let crash = in_order(serial, 0, &[CRASHING_MODEM])?;
    let crashed = in_order(serial, crash, &[MODEM_CRASH])?;
    // The new instance may print before the root task says it started it.
    in_order(serial, crashed, &[MODEM_RESTARTED])?;
    in_order(serial, crashed, &[MODEM_SERVING])?;
    in_order(serial, crashed, &[PORT_CLOSED, PORT_OPEN])?;
    let (at, detail) = guest_line(serial, 'd')?;
    if at < crash {
        return Err("the guest's step d line comes before the crash".into());
    }
    Ok(format!(
        "modem crashed and restarted, port closed and reopened; guest: {detail}"
    ))
}

fn step_e(serial: &str) -> std::result::Result<String, String> {
    let (_, detail) = guest_line(serial, 'e')?;
    if !detail.contains("probe: ok") {
        return Err(format!("the probe does not say ok: {detail}"));
    }
    Ok(detail)
}

/// Every step's verdict on one run's output.
pub fn verdicts(serial: &str) -> Vec<Verdict> {
    let reports = reports(serial);
    STEPS
        .iter()
        .map(|&(step, title)| Verdict {
            step,
            title,
            result: match step {
                'a' => step_a(serial),
                'b' => step_b(serial, &reports),
                'c' => step_c(serial, &reports),
                'd' => step_d(serial),
                _ => step_e(serial),
            },
        })
        .collect()
}

/// For the `demo` system test: each step is a part of its own
/// (`demo/a` ... `demo/e`).
pub fn check(serial: &str) -> Vec<systest::Part> {
    verdicts(serial)
        .into_iter()
        .map(|v| systest::Part {
            name: v.step.to_string(),
            result: v.result.map(|shown| format!("{}: {shown}", v.title)),
        })
        .collect()
}

pub fn print_verdicts(emu: Emulator, serial: &str) -> bool {
    println!("\nmodem demo on {}:", emu.name());
    let mut all = true;
    for v in verdicts(serial) {
        let (word, text) = match &v.result {
            Ok(text) => ("PASS", text),
            Err(text) => {
                all = false;
                ("FAIL", text)
            }
        };
        println!("  ({}) {word}: {}\n      {text}", v.step, v.title);
    }
    all
}

/// `cargo xtask demo modem [--emu qemu|bochs]`.
pub fn run(opts: &DemoOpts) -> Result<ExitCode> {
    let test = systest::select(Some("demo"))?
        .into_iter()
        .find(|t| t.name == "demo")
        .ok_or_else(|| crate::Error::Other("no demo system test".into()))?;
    setup::run()?;
    let artifacts = build::build_all()?;
    image::assemble(&artifacts)?;
    let emus: Vec<Emulator> = match opts.emu {
        Some(emu) => vec![emu],
        None => vec![Emulator::Qemu],
    };
    println!(
        "demo: booting the demo image on {} (Bochs takes ~5 minutes); output in {}/",
        emus.iter().map(|e| e.name()).collect::<Vec<_>>().join(", "),
        systest::SYSTEST_DIR
    );
    let results = systest::run_all(&[test], &emus, &artifacts)?;
    let mut all = true;
    for r in &results {
        let serial = fs::read(&r.serial)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        all &= print_verdicts(r.emu, &serial) && r.passed;
        if !r.passed {
            println!("  (the run itself failed: see {})", r.serial.display());
        }
    }
    Ok(if all {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(frames: u64, missed: u64, last_missed: u64, worst: &str) -> String {
        format!(
            "modem: frames {frames}, missed {missed}, worst jitter 9.000 us; last 1000: missed {last_missed}, worst {worst} us\r\n"
        )
    }

    /// A run in which every step worked.
    fn good_run() -> String {
        let mut s = String::new();
        s += &report(1000, 0, 0, "3.000");
        s += "MOAT-DEMO a ok AT: OK; AT+CSQ: +CSQ: 17,2 OK; SMS: +CMGS: 0 OK\n";
        s += SMS_LOGGED;
        s += "\nMOAT-DEMO b load start\n";
        for f in 2..=6 {
            s += &report(f * 1000, 0, 0, if f == 4 { "41.500" } else { "5.000" });
        }
        s += "MOAT-DEMO b load end\n";
        s += &report(7000, 0, 0, "4.000");
        s += "MOAT-DEMO b ok stress: done\n";
        s += PANICKING;
        s += "\nKernel panic - not syncing\n";
        s += VMM_RESTARTS;
        s += " (restart 1)\n";
        s += &report(8000, 0, 0, "6.000");
        s += &report(9000, 0, 0, "6.000");
        s += "MOAT-DEMO c ok the restarted Linux reached the modem: OK\n";
        s += &report(10000, 0, 0, "6.000");
        s += CRASHING_MODEM;
        s += "\n";
        s += MODEM_CRASH;
        s += "\nvmm: port `modem`: the modem is gone, closed\n";
        s += "roottask: component 'modem' faulted\nroottask: component 'modem' restarted (restart 1)\n";
        s += "modem: serving, frame 1 ms\n";
        s += "vmm: port `modem`: the modem answers, open again\n";
        s += "MOAT-DEMO d ok at: port reset: closed by the host after 20 ms; then AT: OK\n";
        s += "MOAT-DEMO e ok probe: portals 255 tried, 255 refused probe: ok\n";
        s
    }

    #[test]
    fn parses_frame_summaries() {
        let r = reports(&report(12000, 7, 2, "1234.567"));
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].frames, r[0].missed, r[0].last_missed), (12000, 7, 2));
        assert!((r[0].last_worst_us - 1234.567).abs() < 1e-9);
        // A summary cut off by the end of the output is not one.
        assert!(reports("modem: frames 1000, missed 0, worst jit").is_empty());
    }

    #[test]
    fn a_good_run_passes_every_step_with_figures() {
        let v = verdicts(&good_run());
        assert!(v.iter().all(|v| v.result.is_ok()), "{v:#?}");
        let b = v[1].result.as_ref().unwrap();
        assert!(b.contains("missed 0, worst jitter 41.500 us"), "{b}");
        assert!(b.contains("frames 2000..7000"), "{b}");
        assert!(check(&good_run()).iter().all(|p| p.result.is_ok()));
        let names: Vec<String> = check(&good_run()).into_iter().map(|p| p.name).collect();
        assert_eq!(names, ["a", "b", "c", "d", "e"]);
    }

    #[test]
    fn a_missed_deadline_under_load_fails_step_b() {
        let run = good_run().replacen(
            &report(5000, 0, 0, "5.000"),
            &report(5000, 3, 3, "2100.000"),
            1,
        );
        let v = verdicts(&run);
        let why = v[1].result.as_ref().unwrap_err();
        assert!(why.contains("missed 3"), "{why}");
        assert!(v[0].result.is_ok() && v[2].result.is_ok());
    }

    #[test]
    fn a_silent_modem_fails_steps_b_and_c() {
        let run: String = good_run()
            .lines()
            .filter(|l| !l.starts_with(REPORT))
            .map(|l| format!("{l}\n"))
            .collect();
        let v = verdicts(&run);
        assert!(v[1].result.is_err() && v[2].result.is_err(), "{v:#?}");
    }

    #[test]
    fn each_missing_host_line_fails_its_step() {
        for (line, step) in [
            (SMS_LOGGED, 0),
            (VMM_RESTARTS, 2),
            (MODEM_CRASH, 3),
            (MODEM_RESTARTED, 3),
            (PORT_OPEN, 3),
        ] {
            let run = good_run().replace(line, "(gone)");
            let v = verdicts(&run);
            assert!(v[step].result.is_err(), "without {line:?}: {:?}", v[step]);
        }
    }

    #[test]
    fn the_new_modem_may_speak_before_the_root_task() {
        let run = good_run().replace(
            "roottask: component 'modem' restarted (restart 1)\nmodem: serving, frame 1 ms\n",
            "modem: serving, frame 1 ms\nroottask: component 'modem' restarted (restart 1)\n",
        );
        assert_ne!(run, good_run());
        assert!(verdicts(&run)[3].result.is_ok(), "{:?}", verdicts(&run)[3]);
        let run = good_run().replace("modem: serving, frame 1 ms\n", "");
        assert!(verdicts(&run)[3].result.is_err());
    }

    #[test]
    fn the_guest_failing_a_step_fails_it() {
        let run = good_run().replace("MOAT-DEMO e ok", "MOAT-DEMO e FAIL portal 3 answered");
        let why = verdicts(&run)[4].result.clone().unwrap_err();
        assert!(why.contains("portal 3 answered"), "{why}");
        let run = good_run().replace("probe: ok", "probe: FAIL");
        assert!(verdicts(&run)[4].result.is_err());
    }
}
