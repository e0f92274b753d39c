//! The emulators: QEMU and Bochs command lines, Bochs configuration, and
//! supervising a run (timeout, serial capture or streaming, exit status).

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use crate::image::BootSpec;
use crate::util::describe;
use crate::{Context, Result};

/// How long a system test may run before it is killed.
const QEMU_TIMEOUT: Duration = Duration::from_secs(60);
const BOCHS_TIMEOUT: Duration = Duration::from_secs(300);
const POLL: Duration = Duration::from_millis(50);
/// How long a run goes on after its output decided the test, so that a
/// failure right after the last expected line is still seen.
const DECIDED_GRACE: Duration = Duration::from_secs(1);

/// The isa-debug-exit device: the kernel writes `v` to this port and QEMU
/// exits with status `(v << 1) | 1`.
const DEBUG_EXIT_DEVICE: &str = "isa-debug-exit,iobase=0xf4,iosize=0x04";
/// Value the kernel writes when nothing is left to run.
const DEBUG_EXIT_DONE: i32 = 0x10;
/// Value the kernel writes after a kernel panic.
const DEBUG_EXIT_PANIC: i32 = 0x11;

const fn qemu_status(value: i32) -> i32 {
    (value << 1) | 1
}

/// Bochs exits with this status on power-off, the shutdown port, a panic
/// (`panic: action=fatal`) and when its debugger reads end of input.
const BOCHS_STOP_STATUS: i32 = 1;
/// How Bochs' log marks the event that stopped it.
const BOCHS_PANIC_MARK: &str = ">>PANIC<<";

const BOCHS_BIOS: &str = "/usr/share/bochs/BIOS-bochs-latest";
const BOCHS_VGA_BIOS: &str = "/usr/share/vgabios/vgabios.bin";
/// Time between two Bochs starts, and how often to try one that lost the
/// race for an rfb port (see [`run_bochs`]).
const BOCHS_START_GAP: Duration = Duration::from_secs(1);
const BOCHS_START_ATTEMPTS: u32 = 3;
const BOCHS_RFB_BIND_FAILURE: &str = "RFB could not bind any port";
static LAST_BOCHS_START: Mutex<Option<Instant>> = Mutex::new(None);
/// Bochs' built-in debugger reads its first commands from this file: continue.
const BOCHS_DEBUGGER_RC: &str = "c\n";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Emulator {
    /// QEMU TCG with `-cpu max`: AMD SVM.
    Qemu,
    /// Bochs with `corei7_skylake_x`: Intel VMX.
    Bochs,
}

impl Emulator {
    pub const ALL: [Emulator; 2] = [Emulator::Qemu, Emulator::Bochs];

    pub fn name(self) -> &'static str {
        match self {
            Emulator::Qemu => "qemu",
            Emulator::Bochs => "bochs",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.name() == name)
    }

    pub fn timeout(self) -> Duration {
        match self {
            Emulator::Qemu => QEMU_TIMEOUT,
            Emulator::Bochs => BOCHS_TIMEOUT,
        }
    }

    /// Whether the emulator ended the way `debug-exit` makes it end when the
    /// kernel has nothing left to run. (Bochs cannot tell that from a panic.)
    pub fn is_clean_exit(self, status: ExitStatus) -> bool {
        let clean = match self {
            Emulator::Qemu => qemu_status(DEBUG_EXIT_DONE),
            Emulator::Bochs => BOCHS_STOP_STATUS,
        };
        status.code() == Some(clean)
    }

    /// The exit status `cargo xtask run` ends with: 0 for the kernel's
    /// "done"; QEMU's own status when a guest chose its isa-debug-exit
    /// value (the VMM's `debug-exit`, passed on by the root task and the
    /// kernel: odd, and not the kernel's panic value), as if QEMU had run
    /// the guest itself; 1 for anything else (Bochs cannot tell more).
    pub fn run_exit_code(self, status: ExitStatus) -> u8 {
        if self.is_clean_exit(status) {
            return 0;
        }
        match (self, status.code()) {
            (Emulator::Qemu, Some(code))
                if code & 1 == 1 && code != qemu_status(DEBUG_EXIT_PANIC) =>
            {
                code as u8
            }
            _ => 1,
        }
    }

    /// The exit status in words.
    pub fn describe_exit(self, status: ExitStatus) -> String {
        let Some(code) = status.code() else {
            return format!("{status}");
        };
        let meaning = match self {
            Emulator::Qemu if code == qemu_status(DEBUG_EXIT_DONE) => "debug-exit: done",
            Emulator::Qemu if code == qemu_status(DEBUG_EXIT_PANIC) => "debug-exit: kernel panic",
            Emulator::Qemu if code == 0 => "triple fault, reset or power-off",
            Emulator::Qemu if code & 1 == 1 => "debug-exit: the value a guest chose",
            Emulator::Bochs if code == BOCHS_STOP_STATUS => "stopped",
            _ => return format!("status {code}"),
        };
        format!("status {code}, {meaning}")
    }
}

/// Why Bochs stopped, from its log: it reports the shutdown port, power-off
/// and a triple fault (with `reset_on_triple_fault=0`) as panics.
pub fn bochs_stop_reason(log: &Path) -> Option<String> {
    let text = fs::read(log).ok()?;
    let text = String::from_utf8_lossy(&text);
    let line = text.lines().rev().find(|l| l.contains(BOCHS_PANIC_MARK))?;
    let (_, reason) = line.split_once(BOCHS_PANIC_MARK)?;
    Some(reason.trim().to_string())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    Tcg,
    Kvm,
}

/// Where QEMU's first serial port goes.
pub enum Serial<'a> {
    Stdio,
    File(&'a Path),
}

pub fn qemu_args(boot: &BootSpec, accel: Accel, serial: Serial<'_>) -> Result<Vec<String>> {
    let memory = format!("{}M", boot.memory_mib);
    let cpus = boot.cpus.max(1).to_string();
    let mut args: Vec<String> = [
        "-machine",
        "pc",
        "-m",
        &memory,
        "-smp",
        &cpus,
        "-no-reboot",
        "-device",
        DEBUG_EXIT_DEVICE,
        "-display",
        "none",
        "-monitor",
        "none",
        // The machine's RTC holds UTC, as Linux expects; Moat's clock
        // driver gives it to every guest.
        "-rtc",
        "base=utc",
    ]
    .map(String::from)
    .to_vec();
    let (accel, cpu) = match accel {
        Accel::Tcg => ("tcg", "max"),
        Accel::Kvm => ("kvm", "host"),
    };
    args.extend(["-accel", accel, "-cpu", cpu].map(String::from));
    let serial = match serial {
        Serial::Stdio => "stdio".to_string(),
        Serial::File(path) => format!("file:{}", path.display()),
    };
    args.extend(["-serial".to_string(), serial]);
    args.extend(boot.qemu_boot_args()?);
    args.extend(boot.qemu_devices.iter().cloned());
    Ok(args)
}

pub fn qemu_command(args: &[String]) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(args);
    cmd
}

/// The files of one Bochs run.
pub struct BochsFiles {
    pub iso: PathBuf,
    pub serial: PathBuf,
    /// Bochs' own log.
    pub log: PathBuf,
    pub bochsrc: PathBuf,
    pub debugger_rc: PathBuf,
    pub memory_mib: u32,
    /// Processors (`cpu: count=`; Debian's Bochs is built with SMP).
    pub cpus: u32,
}

/// A Bochs configuration that boots `iso` from CD with COM1 going to a file.
///
/// Debian's Bochs has no `nogui`; `rfb` with `timeout=0` runs without waiting
/// for a VNC client. Each instance takes the first free port from 5900 on, so
/// concurrent runs do not collide. A triple fault stops Bochs instead of
/// rebooting into GRUB (QEMU's `-no-reboot`).
/// Bochs' nominal instructions per second; with `clock: sync=none` its TSC
/// counts instructions, so this is the TSC rate its guests see against the
/// PIT.
pub const BOCHS_IPS: u64 = 50_000_000;

pub fn bochsrc(files: &BochsFiles) -> String {
    format!(
        "\
display_library: rfb, options=\"timeout=0\"
cpu: model=corei7_skylake_x, count={cpus}, ips={BOCHS_IPS}, reset_on_triple_fault=0
megs: {megs}
romimage: file={BOCHS_BIOS}
vgaromimage: file={BOCHS_VGA_BIOS}
ata0-master: type=cdrom, path={iso}, status=inserted
boot: cdrom
clock: sync=none, time0=utc
com1: enabled=1, mode=file, dev={serial}
sound: driver=dummy
log: {log}
panic: action=fatal
error: action=report
info: action=ignore
",
        iso = files.iso.display(),
        serial = files.serial.display(),
        log = files.log.display(),
        megs = files.memory_mib,
        cpus = files.cpus.max(1),
    )
}

/// Writes the bochsrc and debugger script, and removes a stale serial log.
pub fn prepare_bochs(files: &BochsFiles) -> Result<()> {
    for path in [&files.bochsrc, &files.debugger_rc] {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).context(|| format!("cannot create {}", dir.display()))?;
        }
    }
    fs::write(&files.bochsrc, bochsrc(files))
        .context(|| format!("cannot write {}", files.bochsrc.display()))?;
    fs::write(&files.debugger_rc, BOCHS_DEBUGGER_RC)
        .context(|| format!("cannot write {}", files.debugger_rc.display()))?;
    remove_stale(&files.serial)
}

pub fn bochs_command(files: &BochsFiles) -> Command {
    let mut cmd = Command::new("bochs");
    cmd.arg("-q")
        .arg("-f")
        .arg(&files.bochsrc)
        .arg("-rc")
        .arg(&files.debugger_rc);
    cmd
}

pub fn remove_stale(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(e).context(|| format!("cannot remove {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Starts `cmd` with no input and its stdout and stderr in `output`.
pub fn spawn_logged(cmd: &mut Command, output: &Path) -> Result<Child> {
    let out = File::create(output).context(|| format!("cannot create {}", output.display()))?;
    let err = out
        .try_clone()
        .context(|| "cannot duplicate a file handle".into())?;
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .context(|| format!("cannot start `{}`", describe(cmd)))
}

/// Asked while an emulator runs: has its output decided the run (so it can
/// be stopped)?
pub type Decided<'a> = &'a dyn Fn() -> bool;

/// Runs QEMU with the given arguments, its own output going to `output`.
///
/// QEMU's monitor listens on a socket beside `output` (`.monitor`); a run
/// that times out is sampled there before it is killed (see
/// [`sample_stalled_qemu`]).
pub fn run_qemu(
    args: &[String],
    timeout: Option<Duration>,
    decided: Option<Decided<'_>>,
    output: &Path,
) -> Result<Outcome> {
    let monitor = output.with_extension("monitor");
    remove_stale(&monitor)?;
    let serial = serial_file(args);
    let args = with_monitor(args, &monitor);
    let child = spawn_logged(&mut qemu_command(&args), output)?;
    let sample =
        || sample_stalled_qemu(&monitor, serial.as_deref(), &output.with_extension("stall"));
    supervise_with(child, timeout, None, decided, Some(&sample))
}

/// `text` with each `root sel N` followed by the name of the component
/// `names` gives for selector N.
fn name_root_selectors(text: &str, names: &[(String, String)]) -> String {
    const MARK: &str = "root sel ";
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find(MARK) {
        let after = &rest[at + MARK.len()..];
        let digits = after.len() - after.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        out.push_str(&rest[..at + MARK.len() + digits]);
        if let Some((_, name)) = names.iter().find(|(sel, _)| *sel == after[..digits]) {
            out.push_str(&format!(" '{name}'"));
        }
        rest = &after[digits..];
    }
    out.push_str(rest);
    out
}

/// The file QEMU's first serial port writes (`-serial file:PATH`).
fn serial_file(args: &[String]) -> Option<PathBuf> {
    let at = args.iter().position(|a| a == "-serial")?;
    args.get(at + 1)?.strip_prefix("file:").map(PathBuf::from)
}

/// `args` with QEMU's monitor on the unix socket `path` instead of none.
fn with_monitor(args: &[String], path: &Path) -> Vec<String> {
    let socket = format!("unix:{},server=on,wait=off", path.display());
    let mut out = Vec::with_capacity(args.len() + 2);
    let mut replaced = false;
    let mut words = args.iter();
    while let Some(word) = words.next() {
        if word == "-monitor" {
            words.next();
            out.extend(["-monitor".to_string(), socket.clone()]);
            replaced = true;
        } else {
            out.push(word.clone());
        }
    }
    if !replaced {
        out.extend(["-monitor".to_string(), socket]);
    }
    out
}

/// Monitor samples of a stalled run: every CPU's registers, this often.
const STALL_SAMPLES: usize = 3;
const STALL_SAMPLE_GAP: Duration = Duration::from_secs(1);
/// How long Moat gets to print its state dump after the NMI (the
/// register samples follow, so the dump has their time too).
const DUMP_WAIT: Duration = Duration::from_secs(2);

/// The lines of Moat's state dump in serial output: the kernel's
/// (`dump: …`, hypervisor/kernel/src/dump.rs) and each VMM's (`vmm: dump:
/// …`), with a PD the root task started named after its component (the
/// kernel prints `pd 3 = root sel 32`, the root task `started 'linux' (pd
/// sel 32, …)`).
pub fn dump_lines(serial: &str) -> Vec<String> {
    let mut names: Vec<(String, String)> = Vec::new();
    let mut lines = Vec::new();
    for line in serial.lines() {
        let line = line.trim_end_matches('\r');
        if let Some(rest) = line.split_once("roottask: started '").map(|(_, r)| r) {
            if let Some((name, rest)) = rest.split_once("' (pd sel ") {
                let sel: String = rest.chars().take_while(char::is_ascii_digit).collect();
                names.retain(|(s, _)| *s != sel);
                names.push((sel, name.to_string()));
            }
        }
        let Some(at) = line.find("dump: ") else {
            continue;
        };
        // A CPU's NMI line may follow a partial line (a shell prompt).
        let is_dump = line[..at].is_empty()
            || line[..at].ends_with("vmm: ")
            || (line[at..].starts_with("dump: cpu") && line.contains(" nmi at rip "));
        if !is_dump {
            continue;
        }
        let text = name_root_selectors(&line[at..], &names);
        let from_vmm = line[..at].ends_with("vmm: ");
        lines.push(if from_vmm {
            format!("vmm: {text}")
        } else {
            text
        });
    }
    lines
}

/// What a person needs to see why a QEMU run stalled, before it is
/// killed: each CPU's registers, sampled [`STALL_SAMPLES`] times (a RIP
/// that never moves is a guest spinning in one place, or one exiting
/// without progress), then the local APIC; the full text goes to `file`
/// and the RIP/RFLAGS lines to stdout.
///
/// First Moat is asked for its state dump: the monitor's `nmi` reaches
/// every CPU, the kernel prints its state and the VMMs theirs on the
/// serial port; those lines (from the serial log, past what it held before
/// the NMI) go to `file` and stdout too.
fn sample_stalled_qemu(monitor: &Path, serial: Option<&Path>, file: &Path) {
    let serial_len = serial
        .and_then(|s| fs::metadata(s).ok())
        .map_or(0, |m| m.len());
    monitor_command(monitor, "nmi");
    thread::sleep(DUMP_WAIT);
    let mut text = String::new();
    for sample in 0..STALL_SAMPLES {
        if sample > 0 {
            thread::sleep(STALL_SAMPLE_GAP);
        }
        text.push_str(&format!("--- sample {} ---\n", sample + 1));
        text.push_str(&monitor_command(monitor, "info registers -a"));
    }
    text.push_str("--- local APIC ---\n");
    text.push_str(&monitor_command(monitor, "info lapic"));
    let whole = serial.and_then(|s| fs::read(s).ok()).unwrap_or_default();
    // The whole log for the names; the dump's lines only after the NMI.
    let before = String::from_utf8_lossy(&whole[..(serial_len as usize).min(whole.len())]);
    let skip = dump_lines(&before).len();
    let dump: Vec<String> = dump_lines(&String::from_utf8_lossy(&whole))
        .into_iter()
        .skip(skip)
        .collect();
    text.push_str("--- Moat's state dump (after the NMI) ---\n");
    for line in &dump {
        text.push_str(line);
        text.push('\n');
    }
    let _ = fs::write(file, &text);
    println!(
        "    stalled: QEMU's view before the kill ({}):",
        file.display()
    );
    for line in text.lines() {
        let shown = ["--- sample", "CPU#", "RIP=", "EIP="];
        if shown.iter().any(|p| line.starts_with(p)) {
            println!("      {line}");
        }
    }
    if dump.is_empty() {
        println!("    no state dump from Moat after the NMI");
    } else {
        println!("    Moat's state dump:");
        for line in &dump {
            println!("      {line}");
        }
    }
}

/// One monitor command's answer (empty if the monitor cannot be reached).
fn monitor_command(path: &Path, command: &str) -> String {
    use std::os::unix::net::UnixStream;
    let Ok(mut stream) = UnixStream::connect(path) else {
        return String::new();
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let prompt: &[u8] = b"(qemu) ";
    // The greeting ends at the first prompt; the answer, after the echo
    // of the command, at a prompt that starts a line.
    let mut greeting = Vec::new();
    while !greeting.ends_with(prompt) {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return String::new(),
            Ok(n) => greeting.extend_from_slice(&buf[..n]),
        }
    }
    if stream.write_all(format!("{command}\n").as_bytes()).is_err() {
        return String::new();
    }
    while !(answer.ends_with(prompt) && answer.contains(&b'\n')) {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&answer);
    // Drop the echoed command line (with its terminal escapes) and prompt.
    text.lines()
        .filter(|l| !l.contains("(qemu)") && !l.contains('\u{1b}'))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Runs Bochs, its own output going to `output`; with `echo`, streams the
/// serial log to stdout.
///
/// Bochs 2.7's rfb server reuses one socket while it looks for a free port:
/// when two instances bind 5900 at the same moment (SO_REUSEADDR lets both),
/// the loser's `listen` fails and every later `bind` on that socket does too,
/// so it panics with "RFB could not bind any port". Starts are therefore
/// spaced apart, and a run that lost the race anyway is started again.
pub fn run_bochs(
    files: &BochsFiles,
    timeout: Option<Duration>,
    echo: bool,
    decided: Option<Decided<'_>>,
    output: &Path,
) -> Result<Outcome> {
    let mut attempt = 1;
    loop {
        remove_stale(&files.serial)?;
        remove_stale(&files.log)?;
        let child = {
            let mut last = LAST_BOCHS_START
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(gap) = last.and_then(|t| BOCHS_START_GAP.checked_sub(t.elapsed())) {
                thread::sleep(gap);
            }
            let child = spawn_logged(&mut bochs_command(files), output)?;
            *last = Some(Instant::now());
            child
        };
        let outcome = supervise(
            child,
            timeout,
            echo.then_some(files.serial.as_path()),
            decided,
        )?;
        let lost_race = bochs_stop_reason(&files.log)
            .is_some_and(|reason| reason.contains(BOCHS_RFB_BIND_FAILURE));
        if !lost_race || attempt == BOCHS_START_ATTEMPTS {
            return Ok(outcome);
        }
        attempt += 1;
    }
}

/// How a supervised run ended.
pub enum Exit {
    Status(ExitStatus),
    TimedOut,
    /// Stopped because its output had decided the run.
    Decided,
}

pub struct Outcome {
    pub exit: Exit,
    pub elapsed: Duration,
}

/// Waits for `child`, killing it after `timeout`, or [`DECIDED_GRACE`] after
/// `decided` first says yes. With `echo`, bytes appended to that file are
/// copied to stdout while the child runs (Bochs' serial port).
pub fn supervise(
    child: Child,
    timeout: Option<Duration>,
    echo: Option<&Path>,
    decided: Option<Decided<'_>>,
) -> Result<Outcome> {
    supervise_with(child, timeout, echo, decided, None)
}

/// [`supervise`], calling `on_timeout` before a timed-out child is killed.
fn supervise_with(
    mut child: Child,
    timeout: Option<Duration>,
    echo: Option<&Path>,
    decided: Option<Decided<'_>>,
    on_timeout: Option<&dyn Fn()>,
) -> Result<Outcome> {
    let start = Instant::now();
    let mut follower = echo.map(Follower::new);
    let mut decided_at: Option<Instant> = None;
    let exit = loop {
        if let Some(f) = &mut follower {
            f.pump();
        }
        if let Some(status) = child
            .try_wait()
            .context(|| "cannot wait for emulator".into())?
        {
            break Exit::Status(status);
        }
        if timeout.is_some_and(|t| start.elapsed() >= t) {
            if let Some(sample) = on_timeout {
                sample();
            }
            // Already exited if kill fails; the wait below reaps it either way.
            let _ = child.kill();
            let _ = child.wait();
            break Exit::TimedOut;
        }
        if decided_at.is_none() && decided.is_some_and(|d| d()) {
            decided_at = Some(Instant::now());
        }
        if decided_at.is_some_and(|t| t.elapsed() >= DECIDED_GRACE) {
            let _ = child.kill();
            let _ = child.wait();
            break Exit::Decided;
        }
        thread::sleep(POLL);
    };
    if let Some(f) = &mut follower {
        f.pump();
    }
    Ok(Outcome {
        exit,
        elapsed: start.elapsed(),
    })
}

/// `tail -f` for one file that may not exist yet.
struct Follower {
    path: PathBuf,
    offset: u64,
}

impl Follower {
    fn new(path: &Path) -> Self {
        Follower {
            path: path.to_path_buf(),
            offset: 0,
        }
    }

    fn pump(&mut self) {
        let Ok(mut file) = File::open(&self.path) else {
            return;
        };
        let mut buf = Vec::new();
        if file.seek(SeekFrom::Start(self.offset)).is_ok() && file.read_to_end(&mut buf).is_ok() {
            self.offset += buf.len() as u64;
            let mut out = io::stdout().lock();
            // Losing console output is not worth failing the run over.
            let _ = out.write_all(&buf).and_then(|()| out.flush());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::Module;

    #[test]
    fn the_monitor_replaces_none_or_is_added() {
        let socket = Path::new("t/x.monitor");
        let args: Vec<String> = ["-m", "64M", "-monitor", "none", "-S"]
            .map(String::from)
            .into();
        assert_eq!(
            with_monitor(&args, socket),
            [
                "-m",
                "64M",
                "-monitor",
                "unix:t/x.monitor,server=on,wait=off",
                "-S"
            ]
        );
        assert_eq!(
            with_monitor(&args[..2], socket),
            [
                "-m",
                "64M",
                "-monitor",
                "unix:t/x.monitor,server=on,wait=off"
            ]
        );
    }

    /// A QEMU that never runs (`-S`: the CPU waits at the reset vector)
    /// times out, and its registers were sampled before the kill.
    #[test]
    fn a_stalled_qemu_is_sampled_before_the_kill() {
        if Command::new("qemu-system-x86_64")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("skipped: no qemu-system-x86_64 (cargo xtask setup installs it)");
            return;
        }
        let dir = std::env::temp_dir().join(format!("moat-stall-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let output = dir.join("run.out");
        let args: Vec<String> = [
            "-machine", "pc", "-display", "none", "-monitor", "none", "-S",
        ]
        .map(String::from)
        .into();
        let outcome = run_qemu(&args, Some(Duration::from_secs(2)), None, &output).unwrap();
        assert!(matches!(outcome.exit, Exit::TimedOut));
        let stall = fs::read_to_string(output.with_extension("stall")).unwrap();
        assert_eq!(
            stall.matches("EIP=0000fff0").count(),
            STALL_SAMPLES,
            "{stall}"
        );
        assert!(stall.contains("--- local APIC ---"), "{stall}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn dump_lines_are_collected_and_pds_named() {
        let serial = "\
roottask: started 'echo' (pd sel 32, prio 20, cpu 0, 256 KiB RAM, 64 KiB quota)\r
roottask: started 'linux' (pd sel 33, prio 10, cpu 0, 2048 KiB RAM, 32768 KiB quota)
[    1.0] random: crng init done
/ # dump: cpu1 nmi at rip 0xffff800000000042 (in the kernel), 98 timer ticks
dump: cpu0 nmi at rip 0xffff800000001234 (in a guest), 99 timer ticks
dump: cpu0 current ec 5 (pd 3 = root sel 33, running, runs a vcpu); entered ec 5; ready p20 ec 2 (pd 2 = root sel 32, running)
echo: dump: not a dump line
vmm: dump: exits 10: io 9 hlt 1
";
        assert_eq!(
            dump_lines(serial),
            [
                "dump: cpu1 nmi at rip 0xffff800000000042 (in the kernel), 98 timer ticks",
                "dump: cpu0 nmi at rip 0xffff800000001234 (in a guest), 99 timer ticks",
                "dump: cpu0 current ec 5 (pd 3 = root sel 33 'linux', running, runs a vcpu); \
                 entered ec 5; ready p20 ec 2 (pd 2 = root sel 32 'echo', running)",
                "vmm: dump: exits 10: io 9 hlt 1",
            ]
        );
        assert!(dump_lines("no dump here\n").is_empty());
    }

    #[test]
    fn the_serial_file_is_found_in_qemu_args() {
        let args: Vec<String> = ["-m", "1G", "-serial", "file:t/x.log"]
            .map(String::from)
            .into();
        assert_eq!(serial_file(&args), Some(PathBuf::from("t/x.log")));
        assert_eq!(serial_file(&args[..2]), None);
    }

    fn boot() -> BootSpec {
        BootSpec {
            kernel: "target/image/moat-kernel".into(),
            kernel_args: vec!["debug-exit".into()],
            modules: vec![Module {
                name: "roottask".into(),
                file: "target/image/roottask".into(),
                args: vec!["fault".into()],
            }],
            memory_mib: crate::image::DEFAULT_MEMORY_MIB,
            cpus: 1,
            qemu_devices: Vec::new(),
        }
    }

    #[test]
    fn qemu_tcg_command_line() {
        let args = qemu_args(&boot(), Accel::Tcg, Serial::File(Path::new("t/x.log"))).unwrap();
        assert_eq!(
            args.join(" "),
            "-machine pc -m 512M -smp 1 -no-reboot \
             -device isa-debug-exit,iobase=0xf4,iosize=0x04 -display none -monitor none \
             -rtc base=utc -accel tcg -cpu max -serial file:t/x.log \
             -kernel target/image/moat-kernel -append debug-exit \
             -initrd target/image/roottask fault"
        );
    }

    #[test]
    fn qemu_smp() {
        let boot = BootSpec { cpus: 4, ..boot() };
        let args = qemu_args(&boot, Accel::Tcg, Serial::Stdio).unwrap();
        assert!(args.join(" ").contains("-m 512M -smp 4 -no-reboot"));
    }

    #[test]
    fn qemu_kvm_uses_host_cpu() {
        let args = qemu_args(&boot(), Accel::Kvm, Serial::Stdio).unwrap();
        let text = args.join(" ");
        assert!(
            text.contains("-accel kvm -cpu host -serial stdio"),
            "{text}"
        );
        assert!(text.contains("-rtc base=utc"), "{text}");
    }

    #[test]
    fn exit_statuses() {
        assert_eq!(qemu_status(DEBUG_EXIT_DONE), 33);
        assert_eq!(qemu_status(DEBUG_EXIT_PANIC), 35);
    }

    #[test]
    fn run_passes_on_a_guest_chosen_status() {
        use std::os::unix::process::ExitStatusExt;
        let exited = |code: i32| ExitStatus::from_raw(code << 8);
        assert_eq!(Emulator::Qemu.run_exit_code(exited(33)), 0);
        assert_eq!(Emulator::Qemu.run_exit_code(exited(0x55)), 0x55);
        assert_eq!(Emulator::Qemu.run_exit_code(exited(35)), 1);
        assert_eq!(Emulator::Qemu.run_exit_code(exited(0)), 1);
        assert_eq!(Emulator::Bochs.run_exit_code(exited(1)), 0);
        assert_eq!(Emulator::Bochs.run_exit_code(exited(2)), 1);
    }

    #[test]
    fn bochs_reason_from_log() {
        let dir = std::env::temp_dir().join(format!("xtask-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let log = dir.join("bochs.log");
        fs::write(
            &log,
            "00000000000i[      ] reading configuration\n\
             00231076521p[UNMAP ] >>PANIC<< Shutdown port: shutdown requested\n",
        )
        .unwrap();
        assert_eq!(
            bochs_stop_reason(&log).as_deref(),
            Some("Shutdown port: shutdown requested")
        );
        assert_eq!(bochs_stop_reason(&dir.join("absent")), None);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn supervise_kills_at_timeout() {
        let child = Command::new("sleep").arg("30").spawn().unwrap();
        let outcome = supervise(child, Some(Duration::from_millis(200)), None, None).unwrap();
        assert!(matches!(outcome.exit, Exit::TimedOut));
        assert!(outcome.elapsed < Duration::from_secs(10));
        let child = Command::new("true").spawn().unwrap();
        let outcome = supervise(child, Some(Duration::from_secs(30)), None, None).unwrap();
        assert!(matches!(outcome.exit, Exit::Status(s) if s.success()));
    }

    #[test]
    fn supervise_stops_once_decided() {
        let child = Command::new("sleep").arg("30").spawn().unwrap();
        let start = Instant::now();
        let decided = move || start.elapsed() > Duration::from_millis(100);
        let outcome =
            supervise(child, Some(Duration::from_secs(20)), None, Some(&decided)).unwrap();
        assert!(matches!(outcome.exit, Exit::Decided));
        assert!(outcome.elapsed >= DECIDED_GRACE);
        assert!(outcome.elapsed < Duration::from_secs(10));
    }

    #[test]
    fn bochsrc_text() {
        let files = BochsFiles {
            iso: "target/systest/boot.iso".into(),
            serial: "target/systest/boot-bochs.log".into(),
            log: "target/systest/boot-bochs.bochslog".into(),
            bochsrc: "target/systest/boot.bochsrc".into(),
            debugger_rc: "target/systest/bochs.rc".into(),
            memory_mib: crate::image::DEFAULT_MEMORY_MIB,
            cpus: 1,
        };
        let rc = bochsrc(&files);
        for line in [
            "display_library: rfb, options=\"timeout=0\"\n",
            "cpu: model=corei7_skylake_x, count=1, ips=50000000, reset_on_triple_fault=0\n",
            "ata0-master: type=cdrom, path=target/systest/boot.iso, status=inserted\n",
            "com1: enabled=1, mode=file, dev=target/systest/boot-bochs.log\n",
            "log: target/systest/boot-bochs.bochslog\n",
            "boot: cdrom\n",
            "clock: sync=none, time0=utc\n",
            "panic: action=fatal\n",
        ] {
            assert!(rc.contains(line), "{line:?} not in\n{rc}");
        }
        let cmd = bochs_command(&files);
        assert_eq!(
            describe(&cmd),
            "bochs -q -f target/systest/boot.bochsrc -rc target/systest/bochs.rc"
        );
        let two = bochsrc(&BochsFiles { cpus: 2, ..files });
        assert!(
            two.contains("cpu: model=corei7_skylake_x, count=2,"),
            "{two}"
        );
    }
}
