//! `at`: one AT command, or one SMS, over a virtio-console port found by
//! name. The request, response lines assembled from reads of any size, the
//! final result codes (ITU-T V.250, 3GPP TS 27.007 and 27.005), the SMS
//! prompt, the conversation over a non-blocking port, and waiting for the
//! host to close and reopen the port (a modem restart, as the VMM shows
//! it).

use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use crate::args::{Parsed, UsageError, Word, Words};

pub const DEFAULT_PORT: &str = "modem";
pub const DEFAULT_TIMEOUT_SECS: u64 = 5;
const MAX_TIMEOUT_SECS: u64 = 3600;
/// One directory per virtio-console port (`vportXpY`, also its name in
/// `/dev`), each with a `name` file holding the port's name.
pub const PORTS_DIR: &str = "/sys/class/virtio-ports";
/// The modem is not trusted to end its lines: a longer one is split.
pub const MAX_LINE: usize = 1024;
/// The wait between two looks at a port that had nothing to say.
const POLL_INTERVAL: Duration = Duration::from_millis(1);
const MAX_NUMBER_DIGITS: usize = 20;

const CR: u8 = b'\r';
const LF: u8 = b'\n';
/// Ends the text of an SMS (27.005 §3.5.1).
const CTRL_Z: char = '\u{1a}';
/// Cancels an SMS.
const ESC: char = '\u{1b}';
/// What the modem sends when it waits for the SMS text: "\r\n> ".
const PROMPT: &str = ">";

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// One command line, sent with a CR.
    Command(String),
    /// `AT+CMGS="number"`, then the text and Ctrl-Z at the prompt.
    Sms { number: String, text: String },
}

impl Request {
    pub fn command(line: &str) -> Result<Request, UsageError> {
        if line.is_empty() || line.contains(['\r', '\n', CTRL_Z, ESC]) {
            return Err(UsageError(
                "a command is one non-empty line without CR, LF, Ctrl-Z or ESC".into(),
            ));
        }
        Ok(Request::Command(line.to_string()))
    }

    pub fn sms(number: &str, text: &str) -> Result<Request, UsageError> {
        let digits = number.strip_prefix('+').unwrap_or(number);
        let number_ok = !digits.is_empty()
            && digits.len() <= MAX_NUMBER_DIGITS
            && digits.bytes().all(|b| b.is_ascii_digit());
        if !number_ok {
            return Err(UsageError(format!(
                "`{number}` is not a phone number (up to {MAX_NUMBER_DIGITS} digits, an optional +)"
            )));
        }
        if text.contains([CTRL_Z, ESC]) {
            return Err(UsageError("the SMS text cannot hold Ctrl-Z or ESC".into()));
        }
        Ok(Request::Sms {
            number: number.to_string(),
            text: text.to_string(),
        })
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct Options {
    pub port: String,
    pub timeout: Duration,
    pub job: Job,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Job {
    Request(Request),
    /// `--await-reset [COMMAND]`: send the command, if any (its answer is
    /// not awaited), then wait until the host closes the port and opens
    /// it again.
    AwaitReset(Option<Request>),
}

impl Options {
    /// `[--port NAME] [--timeout SECS] (COMMAND | --sms NUMBER TEXT |
    /// --await-reset)`.
    pub fn parse(args: &[String]) -> Result<Parsed<Options>, UsageError> {
        let mut port = DEFAULT_PORT.to_string();
        let mut timeout_secs = DEFAULT_TIMEOUT_SECS;
        let mut sms_number = None;
        let mut await_reset = false;
        let mut positional = Vec::new();
        let mut words = Words::new(args);
        while let Some(word) = words.next_word() {
            match word {
                Word::Help => return Ok(Parsed::Help),
                Word::Flag("port", v) => port = words.value("port", v)?.to_string(),
                Word::Flag("timeout", v) => {
                    timeout_secs = words.number("timeout", v, 1..=MAX_TIMEOUT_SECS)?;
                }
                Word::Flag("sms", v) => sms_number = Some(words.value("sms", v)?),
                Word::Flag("await-reset", None) => await_reset = true,
                Word::Flag(name, _) => return Err(UsageError::unknown_flag(name)),
                Word::Positional(p) => positional.push(p),
            }
        }
        if port.is_empty() {
            return Err(UsageError("--port needs a name".into()));
        }
        let job = match (await_reset, sms_number, positional.as_slice()) {
            (true, None, []) => Job::AwaitReset(None),
            (true, None, [command]) => Job::AwaitReset(Some(Request::command(command)?)),
            (true, _, _) => {
                return Err(UsageError("--await-reset takes at most one command".into()));
            }
            (false, None, [command]) => Job::Request(Request::command(command)?),
            (false, Some(number), [text]) => Job::Request(Request::sms(number, text)?),
            (false, None, _) => {
                return Err(UsageError("give one command, e.g. 'AT+CSQ'".into()));
            }
            (false, Some(_), _) => return Err(UsageError("--sms NUMBER takes one TEXT".into())),
        };
        Ok(Parsed::Run(Options {
            port,
            timeout: Duration::from_secs(timeout_secs),
            job,
        }))
    }
}

/// How the modem ended its answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// A data connection is up (`CONNECT`, with or without a rate).
    Connect,
    /// `ERROR`, `+CME ERROR: n`, `+CMS ERROR: n` or a failed dial.
    Error,
}

impl Outcome {
    pub fn exit_code(self) -> u8 {
        match self {
            Outcome::Ok | Outcome::Connect => 0,
            Outcome::Error => 1,
        }
    }
}

/// The outcome a final result code line stands for; `None` for any other
/// line (information text, `+CMGS: n`, unsolicited codes like `RING`).
pub fn final_result(line: &str) -> Option<Outcome> {
    match line {
        "OK" => Some(Outcome::Ok),
        "ERROR" | "NO CARRIER" | "BUSY" | "NO ANSWER" | "NO DIALTONE" => Some(Outcome::Error),
        "CONNECT" => Some(Outcome::Connect),
        _ if line.starts_with("CONNECT ") => Some(Outcome::Connect),
        _ if line.starts_with("+CME ERROR:") || line.starts_with("+CMS ERROR:") => {
            Some(Outcome::Error)
        }
        _ => None,
    }
}

/// Assembles lines from bytes as they come: a line ends at CR or LF, is
/// trimmed, and empty lines are dropped (responses are framed "\r\n...\r\n").
#[derive(Debug, Default)]
pub struct LineBuffer {
    partial: Vec<u8>,
}

impl LineBuffer {
    /// The lines `bytes` completed.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut lines = Vec::new();
        for &b in bytes {
            if b == CR || b == LF {
                self.end_line(&mut lines);
            } else {
                if self.partial.len() >= MAX_LINE {
                    self.end_line(&mut lines);
                }
                self.partial.push(b);
            }
        }
        lines
    }

    /// The bytes of the line not ended yet.
    pub fn pending(&self) -> &[u8] {
        &self.partial
    }

    fn end_line(&mut self, lines: &mut Vec<String>) {
        let line = String::from_utf8_lossy(&self.partial).trim().to_string();
        self.partial.clear();
        if !line.is_empty() {
            lines.push(line);
        }
    }
}

/// What the conversation asks of its caller.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// A response line to show (control characters made visible).
    Line(String),
    /// Bytes to write to the port.
    Send(Vec<u8>),
    /// The final result came; later bytes are ignored.
    Done(Outcome),
}

#[derive(Debug, PartialEq, Eq)]
enum Stage {
    /// `AT+CMGS` sent; the text goes at the prompt.
    AwaitPrompt {
        text: String,
    },
    AwaitResult,
    Done,
}

/// One request's conversation, fed the port's bytes.
#[derive(Debug)]
pub struct Exchange {
    lines: LineBuffer,
    stage: Stage,
    /// The last line sent, to skip its echo (V.250 `ATE1`, the default).
    sent: String,
}

impl Exchange {
    /// The conversation and the bytes that open it.
    pub fn start(request: &Request) -> (Exchange, Vec<u8>) {
        let (sent, stage) = match request {
            Request::Command(line) => (line.clone(), Stage::AwaitResult),
            Request::Sms { number, text } => (
                format!("AT+CMGS=\"{number}\""),
                Stage::AwaitPrompt { text: text.clone() },
            ),
        };
        let mut bytes = sent.clone().into_bytes();
        bytes.push(CR);
        let exchange = Exchange {
            lines: LineBuffer::default(),
            stage,
            sent,
        };
        (exchange, bytes)
    }

    pub fn is_done(&self) -> bool {
        self.stage == Stage::Done
    }

    pub fn feed(&mut self, bytes: &[u8]) -> Vec<Event> {
        let mut events = Vec::new();
        for line in self.lines.push(bytes) {
            if self.is_done() {
                break;
            }
            if is_echo(&line, &self.sent) {
                continue;
            }
            if line == PROMPT {
                self.at_prompt(&mut events);
                continue;
            }
            let result = final_result(&line);
            events.push(Event::Line(visible(&line)));
            if let Some(outcome) = result {
                self.stage = Stage::Done;
                events.push(Event::Done(outcome));
            }
        }
        // The prompt has no line end: it is whatever is pending.
        let prompted = String::from_utf8_lossy(self.lines.pending()).trim() == PROMPT;
        if prompted && matches!(self.stage, Stage::AwaitPrompt { .. }) {
            self.lines = LineBuffer::default();
            self.at_prompt(&mut events);
        }
        events
    }

    fn at_prompt(&mut self, events: &mut Vec<Event>) {
        if let Stage::AwaitPrompt { text } = &self.stage {
            let mut bytes = text.clone().into_bytes();
            bytes.push(CTRL_Z as u8);
            events.push(Event::Send(bytes));
            self.sent = text.clone();
            self.stage = Stage::AwaitResult;
        }
    }
}

/// The modem's echo of `sent`, possibly behind the prompt and before the
/// Ctrl-Z.
fn is_echo(line: &str, sent: &str) -> bool {
    line.trim_start_matches(PROMPT)
        .trim()
        .trim_end_matches(CTRL_Z)
        == sent
}

/// `line` with control characters escaped, safe to print to a terminal.
fn visible(line: &str) -> String {
    let mut shown = String::with_capacity(line.len());
    for c in line.chars() {
        if c.is_control() {
            shown.extend(c.escape_default());
        } else {
            shown.push(c);
        }
    }
    shown
}

#[derive(Debug)]
pub enum Failure {
    /// No final result before the deadline.
    Timeout,
    Io(io::Error),
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Failure {
        Failure::Io(e)
    }
}

/// Runs `request` over `port`, opened non-blocking: reads and writes give
/// `WouldBlock` instead of waiting, and a read gives 0 while nobody is
/// connected on the host side (Linux's virtio-console driver; a write then
/// gives `WouldBlock`, so a port whose modem restarts is simply retried).
/// Stale input is dropped first. The response lines go to `out`.
pub fn converse<P: Read + Write>(
    port: &mut P,
    request: &Request,
    timeout: Duration,
    out: &mut impl Write,
) -> Result<Outcome, Failure> {
    let start = Instant::now();
    let timed_out = || start.elapsed() >= timeout;
    let mut buf = [0u8; 512];
    loop {
        match port.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
        if timed_out() {
            return Err(Failure::Timeout);
        }
    }
    let (mut exchange, mut outbox) = Exchange::start(request);
    loop {
        let mut progress = false;
        if !outbox.is_empty() {
            match port.write(&outbox) {
                Ok(n) => {
                    outbox.drain(..n.min(outbox.len()));
                    progress = n > 0;
                }
                Err(e) if transient(&e) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let received = match port.read(&mut buf) {
            Ok(n) => buf.get(..n).unwrap_or(&buf),
            Err(e) if transient(&e) => &[],
            Err(e) => return Err(e.into()),
        };
        progress |= !received.is_empty();
        for event in exchange.feed(received) {
            match event {
                Event::Line(line) => writeln!(out, "{line}")?,
                Event::Send(bytes) => outbox.extend(bytes),
                Event::Done(outcome) => return Ok(outcome),
            }
        }
        if timed_out() {
            return Err(Failure::Timeout);
        }
        if !progress {
            thread::sleep(POLL_INTERVAL);
        }
    }
}

/// How long [`await_reset`] waited for each half of the reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reset {
    pub closed_after: Duration,
    pub open_after: Duration,
}

/// Waits until the host end of `port` (opened non-blocking) closes and
/// opens again. Linux's virtio-console driver tells the two apart on a
/// read: 0 bytes while the host end is closed, `WouldBlock` (or data,
/// which is dropped: the session it belonged to is gone) while it is open.
/// `send` goes out first (the port is still open then).
pub fn await_reset<P: Read + Write>(
    port: &mut P,
    send: &[u8],
    timeout: Duration,
) -> Result<Reset, Failure> {
    let start = Instant::now();
    let mut buf = [0u8; 512];
    let mut closed_after = None;
    let mut unsent = send;
    while !unsent.is_empty() {
        match port.write(unsent) {
            Ok(n) => unsent = unsent.get(n..).unwrap_or_default(),
            Err(e) if transient(&e) => thread::sleep(POLL_INTERVAL),
            Err(e) => return Err(e.into()),
        }
        if start.elapsed() >= timeout {
            return Err(Failure::Timeout);
        }
    }
    loop {
        let open = match port.read(&mut buf) {
            Ok(0) => false,
            Ok(_) => true,
            Err(e) if transient(&e) => true,
            Err(e) => return Err(e.into()),
        };
        match (closed_after, open) {
            (None, false) => closed_after = Some(start.elapsed()),
            (Some(closed_after), true) => {
                return Ok(Reset {
                    closed_after,
                    open_after: start.elapsed(),
                });
            }
            _ => {}
        }
        if start.elapsed() >= timeout {
            return Err(Failure::Timeout);
        }
        thread::sleep(POLL_INTERVAL);
    }
}

fn transient(e: &io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted)
}

/// `O_NONBLOCK` of Linux x86-64 (asm-generic/fcntl.h).
const O_NONBLOCK: i32 = 0o4000;

/// Finds the port called `name` in [`PORTS_DIR`] and opens its device for
/// reading and writing (`nonblocking`: reads and writes give `WouldBlock`
/// instead of waiting); the device and the file, or what went wrong.
pub fn open_port(name: &str, nonblocking: bool) -> Result<(PathBuf, File), String> {
    let device = match find_port(Path::new(PORTS_DIR), name) {
        Ok(Some(device)) => Path::new("/dev").join(device),
        Ok(None) => return Err(format!("no virtio-console port named `{name}`")),
        Err(e) => return Err(format!("cannot list {PORTS_DIR}: {e}")),
    };
    let flags = if nonblocking { O_NONBLOCK } else { 0 };
    match OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(flags)
        .open(&device)
    {
        Ok(file) => Ok((device, file)),
        Err(e) => Err(format!("cannot open {}: {e}", device.display())),
    }
}

/// The device name (`vportXpY`) of the port called `name`, from the
/// kernel's list in `ports_dir`.
pub fn find_port(ports_dir: &Path, name: &str) -> io::Result<Option<String>> {
    let mut devices = Vec::new();
    for entry in fs::read_dir(ports_dir)? {
        devices.push(entry?.file_name());
    }
    devices.sort();
    for device in devices {
        // A port without a name has no `name` file, or an empty one.
        let Ok(port_name) = fs::read_to_string(ports_dir.join(&device).join("name")) else {
            continue;
        };
        if port_name.trim_end_matches('\n') == name {
            return Ok(device.into_string().ok());
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::line;
    use std::collections::VecDeque;

    fn run(args: &[&str]) -> Result<Parsed<Options>, UsageError> {
        Options::parse(&line(args))
    }

    fn request(args: &[&str]) -> Request {
        match run(args) {
            Ok(Parsed::Run(Options {
                job: Job::Request(r),
                ..
            })) => r,
            other => panic!("{args:?}: {other:?}"),
        }
    }

    #[test]
    fn parses_commands_sms_and_options() {
        let Ok(Parsed::Run(o)) = run(&["AT+CSQ"]) else {
            panic!()
        };
        assert_eq!(o.port, "modem");
        assert_eq!(o.timeout, Duration::from_secs(5));
        assert_eq!(o.job, Job::Request(Request::Command("AT+CSQ".into())));
        let Ok(Parsed::Run(o)) = run(&["--port=m2", "--timeout", "9", "ATI"]) else {
            panic!()
        };
        assert_eq!((o.port.as_str(), o.timeout.as_secs()), ("m2", 9));
        assert_eq!(
            request(&["--sms", "+4912345", "hello, world"]),
            Request::Sms {
                number: "+4912345".into(),
                text: "hello, world".into()
            }
        );
        assert_eq!(request(&["--", "--x"]), Request::Command("--x".into()));
        assert_eq!(run(&["AT", "--help"]), Ok(Parsed::Help));
        let Ok(Parsed::Run(o)) = run(&["--await-reset", "--timeout", "30"]) else {
            panic!()
        };
        assert_eq!((o.job, o.timeout.as_secs()), (Job::AwaitReset(None), 30));
        let Ok(Parsed::Run(o)) = run(&["--await-reset", "AT+X"]) else {
            panic!()
        };
        assert_eq!(
            o.job,
            Job::AwaitReset(Some(Request::Command("AT+X".into())))
        );
        assert!(run(&["--await-reset", "AT", "AT"]).is_err());
        assert!(run(&["--await-reset", "--sms", "1", "x"]).is_err());
        assert!(run(&["--await-reset=1"]).is_err());
    }

    /// A port whose host end is open, closed, then open again, as reads
    /// of Linux's driver show it: each entry is what one read gives. A
    /// write takes one byte, and every other write is refused.
    #[derive(Default)]
    struct ResettingPort {
        reads: VecDeque<io::Result<usize>>,
        written: Vec<u8>,
        writes: u32,
    }

    impl ResettingPort {
        fn new(reads: impl IntoIterator<Item = io::Result<usize>>) -> Self {
            ResettingPort {
                reads: reads.into_iter().collect(),
                ..Self::default()
            }
        }
    }

    impl Read for ResettingPort {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let next = self
                .reads
                .pop_front()
                .unwrap_or(Err(ErrorKind::WouldBlock.into()));
            if let Ok(n) = next {
                buf[..n].fill(b'x');
            }
            next
        }
    }

    impl Write for ResettingPort {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.writes += 1;
            if self.writes % 2 == 1 || buf.is_empty() {
                return Err(ErrorKind::WouldBlock.into());
            }
            self.written.push(buf[0]);
            Ok(1)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn await_reset_needs_a_close_then_an_open() {
        let would_block = || Err(io::Error::from(ErrorKind::WouldBlock));
        let mut port = ResettingPort::new([would_block(), Ok(3), Ok(0), Ok(0), would_block()]);
        let reset = await_reset(&mut port, b"AT+X\r", Duration::from_secs(5)).unwrap();
        assert!(reset.closed_after <= reset.open_after);
        assert!(
            port.reads.is_empty(),
            "stopped before the port opened again"
        );
        assert_eq!(port.written, b"AT+X\r", "sent whole, before the wait");
        // Open all along: no reset.
        let mut port = ResettingPort::new([]);
        let result = await_reset(&mut port, b"", Duration::from_millis(20));
        assert!(matches!(result, Err(Failure::Timeout)));
        // Closed and never open again: no reset either.
        let mut port = ResettingPort::new((0..100_000).map(|_| Ok(0)));
        let result = await_reset(&mut port, b"", Duration::from_millis(20));
        assert!(matches!(result, Err(Failure::Timeout)));
        // A real error ends the wait.
        let mut port = ResettingPort::new([Err(ErrorKind::BrokenPipe.into())]);
        assert!(matches!(
            await_reset(&mut port, b"", Duration::from_secs(5)),
            Err(Failure::Io(_))
        ));
    }

    #[test]
    fn rejects_bad_command_lines() {
        for args in [
            &[][..],
            &["AT", "AT"],
            &[""],
            &["AT\rATZ"],
            &["AT\u{1a}"],
            &["--sms", "123"],
            &["--sms", "123", "a", "b"],
            &["--sms", "12a", "hi"],
            &["--sms", "+", "hi"],
            &["--sms", "123456789012345678901", "hi"],
            &["--sms", "123", "a\u{1a}b"],
            &["--sms", "12\"3", "hi"],
            &["--timeout", "0", "AT"],
            &["--timeout", "x", "AT"],
            &["--port", "", "AT"],
            &["--port"],
            &["--bogus", "AT"],
        ] {
            assert!(run(args).is_err(), "{args:?}");
        }
    }

    #[test]
    fn final_results() {
        for (line, want) in [
            ("OK", Some(Outcome::Ok)),
            ("ERROR", Some(Outcome::Error)),
            ("+CME ERROR: 10", Some(Outcome::Error)),
            ("+CMS ERROR: 500", Some(Outcome::Error)),
            ("NO CARRIER", Some(Outcome::Error)),
            ("BUSY", Some(Outcome::Error)),
            ("CONNECT", Some(Outcome::Connect)),
            ("CONNECT 115200", Some(Outcome::Connect)),
            ("+CSQ: 23,99", None),
            ("+CMGS: 7", None),
            ("RING", None),
            ("OKAY", None),
            ("CONNECTED", None),
            ("ok", None),
        ] {
            assert_eq!(final_result(line), want, "{line}");
        }
        assert_eq!(Outcome::Ok.exit_code(), 0);
        assert_eq!(Outcome::Connect.exit_code(), 0);
        assert_eq!(Outcome::Error.exit_code(), 1);
    }

    #[test]
    fn lines_assemble_across_reads_of_any_size() {
        let stream = b"\r\n+CSQ: 23,99\r\n\r\nOK\r\nlone\nx";
        for size in 1..=stream.len() {
            let mut buf = LineBuffer::default();
            let lines: Vec<String> = stream.chunks(size).flat_map(|c| buf.push(c)).collect();
            assert_eq!(lines, ["+CSQ: 23,99", "OK", "lone"], "reads of {size}");
            assert_eq!(buf.pending(), b"x");
        }
    }

    #[test]
    fn an_endless_line_is_split_not_hoarded() {
        let mut buf = LineBuffer::default();
        let lines = buf.push(&[b'a'; 3 * MAX_LINE + 5]);
        assert_eq!(lines.len(), 3);
        assert!(lines.iter().all(|l| l.len() == MAX_LINE));
        assert_eq!(buf.pending().len(), 5);
    }

    fn feed_all(ex: &mut Exchange, bytes: &[u8], size: usize) -> Vec<Event> {
        bytes.chunks(size).flat_map(|c| ex.feed(c)).collect()
    }

    #[test]
    fn a_command_skips_its_echo_and_ends_at_the_final_result() {
        let (mut ex, first) = Exchange::start(&Request::Command("AT+CSQ".into()));
        assert_eq!(first, b"AT+CSQ\r");
        let events = feed_all(&mut ex, b"AT+CSQ\r\r\n+CSQ: 23,99\r\n\r\nOK\r\nRING\r\n", 3);
        assert_eq!(
            events,
            [
                Event::Line("+CSQ: 23,99".into()),
                Event::Line("OK".into()),
                Event::Done(Outcome::Ok)
            ]
        );
        assert!(ex.is_done());
        assert!(ex.feed(b"OK\r\n").is_empty(), "nothing after the result");
    }

    #[test]
    fn an_error_result_ends_the_command() {
        let (mut ex, _) = Exchange::start(&Request::Command("AT+X".into()));
        let events = ex.feed(b"\r\n+CME ERROR: 3\r\n");
        assert_eq!(events.last(), Some(&Event::Done(Outcome::Error)));
    }

    #[test]
    fn an_sms_sends_its_text_at_the_prompt() {
        let sms = Request::sms("+4912", "hi there").unwrap();
        // The prompt arrives whole, split, or as a line of its own.
        for (stream, size) in [
            (&b"AT+CMGS=\"+4912\"\r\r\n> "[..], 64),
            (b"AT+CMGS=\"+4912\"\r\r\n> ", 1),
            (b"\r\n>\r\n", 2),
        ] {
            let (mut ex, first) = Exchange::start(&sms);
            assert_eq!(first, b"AT+CMGS=\"+4912\"\r");
            let events = feed_all(&mut ex, stream, size);
            assert_eq!(
                events,
                [Event::Send(b"hi there\x1a".to_vec())],
                "{stream:?}"
            );
            let events = ex.feed(b"hi there\x1a\r\n+CMGS: 4\r\n\r\nOK\r\n");
            assert_eq!(
                events,
                [
                    Event::Line("+CMGS: 4".into()),
                    Event::Line("OK".into()),
                    Event::Done(Outcome::Ok)
                ]
            );
        }
    }

    #[test]
    fn an_sms_refused_before_the_prompt_sends_no_text() {
        let (mut ex, _) = Exchange::start(&Request::sms("1", "x").unwrap());
        let events = ex.feed(b"\r\n+CMS ERROR: 330\r\n> ");
        assert_eq!(
            events,
            [
                Event::Line("+CMS ERROR: 330".into()),
                Event::Done(Outcome::Error)
            ]
        );
    }

    #[test]
    fn a_prompt_outside_an_sms_is_ignored() {
        let (mut ex, _) = Exchange::start(&Request::Command("AT".into()));
        assert!(ex.feed(b"\r\n> ").is_empty());
        assert!(ex.feed(b"\r\n>\r\n").is_empty());
        assert_eq!(
            ex.feed(b"OK\r\n"),
            [Event::Line("OK".into()), Event::Done(Outcome::Ok)]
        );
    }

    #[test]
    fn control_characters_are_shown_escaped() {
        let (mut ex, _) = Exchange::start(&Request::Command("AT".into()));
        let events = ex.feed(b"\x1b[2Jhi\x07\r\n");
        assert_eq!(events, [Event::Line("\\u{1b}[2Jhi\\u{7}".into())]);
    }

    #[test]
    fn hostile_bytes_never_panic() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let alphabet = b"\r\n> OKERRCONNECT+CMS:\x1a\xff\x00a";
        for round in 0..2_000 {
            let sms = round % 2 == 0;
            let req = if sms {
                Request::sms("1", "t").unwrap()
            } else {
                Request::Command("AT".into())
            };
            let (mut ex, _) = Exchange::start(&req);
            let mut done = 0;
            for _ in 0..(next() % 64) {
                let len = (next() % 40) as usize;
                let bytes: Vec<u8> = (0..len)
                    .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                    .collect();
                for event in ex.feed(&bytes) {
                    match event {
                        Event::Done(_) => done += 1,
                        Event::Line(l) => assert!(l.chars().all(|c| !c.is_control())),
                        Event::Send(b) => assert!(sms && b == b"t\x1a"),
                    }
                }
            }
            assert!(done <= 1, "one final result at most");
            assert_eq!(done == 1, ex.is_done());
        }
    }

    /// A port that answers each write with a scripted reply, delivered a
    /// few bytes per read, with `WouldBlock` in between.
    struct FakePort {
        stale: Vec<u8>,
        replies: VecDeque<Vec<u8>>,
        incoming: VecDeque<u8>,
        written: Vec<u8>,
        reads: u32,
    }

    impl FakePort {
        fn new(stale: &[u8], replies: &[&[u8]]) -> Self {
            FakePort {
                stale: stale.to_vec(),
                replies: replies.iter().map(|r| r.to_vec()).collect(),
                incoming: VecDeque::new(),
                written: Vec::new(),
                reads: 0,
            }
        }
    }

    impl Read for FakePort {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.reads += 1;
            if !self.stale.is_empty() {
                let n = self.stale.len().min(buf.len());
                buf[..n].copy_from_slice(&self.stale[..n]);
                self.stale.drain(..n);
                return Ok(n);
            }
            if self.reads.is_multiple_of(2) || self.incoming.is_empty() {
                return Err(ErrorKind::WouldBlock.into());
            }
            let n = self.incoming.len().min(buf.len()).min(3);
            for b in buf.iter_mut().take(n) {
                *b = self.incoming.pop_front().unwrap();
            }
            Ok(n)
        }
    }

    impl Write for FakePort {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            // Takes at most 4 bytes a call; a reply comes once a line ends.
            let n = buf.len().min(4);
            for &b in &buf[..n] {
                self.written.push(b);
                if b == CR || b == CTRL_Z as u8 {
                    let reply = self.replies.pop_front().unwrap_or_default();
                    self.incoming.extend(reply);
                }
            }
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn converse_drops_stale_input_and_sends_an_sms() {
        let mut port = FakePort::new(b"OK\r\n", &[b"\r\n> ", b"\r\n+CMGS: 1\r\n\r\nOK\r\n"]);
        let mut out = Vec::new();
        let sms = Request::sms("555", "hello").unwrap();
        let outcome = converse(&mut port, &sms, Duration::from_secs(5), &mut out).unwrap();
        assert_eq!(outcome, Outcome::Ok);
        assert_eq!(port.written, b"AT+CMGS=\"555\"\rhello\x1a");
        assert_eq!(String::from_utf8(out).unwrap(), "+CMGS: 1\nOK\n");
    }

    #[test]
    fn converse_times_out_on_a_silent_modem() {
        let mut port = FakePort::new(b"", &[]);
        let mut out = Vec::new();
        let at = Request::Command("AT".into());
        let start = Instant::now();
        let result = converse(&mut port, &at, Duration::from_millis(50), &mut out);
        assert!(matches!(result, Err(Failure::Timeout)));
        assert!(start.elapsed() >= Duration::from_millis(50));
        assert_eq!(port.written, b"AT\r");
    }

    #[test]
    fn converse_reports_an_error_result() {
        let mut port = FakePort::new(b"", &[b"AT+BAD\r\r\nERROR\r\n"]);
        let mut out = Vec::new();
        let bad = Request::Command("AT+BAD".into());
        let outcome = converse(&mut port, &bad, Duration::from_secs(5), &mut out).unwrap();
        assert_eq!(outcome, Outcome::Error);
        assert_eq!(out, b"ERROR\n");
    }

    #[test]
    fn finds_ports_by_name() {
        let dir = std::env::temp_dir().join(format!("moat-at-ports-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        for (device, name) in [
            ("vport0p0", None),
            ("vport0p1", Some("moat0\n")),
            ("vport0p2", Some("modem\n")),
        ] {
            fs::create_dir_all(dir.join(device)).unwrap();
            if let Some(name) = name {
                fs::write(dir.join(device).join("name"), name).unwrap();
            }
        }
        assert_eq!(
            find_port(&dir, "modem").unwrap().as_deref(),
            Some("vport0p2")
        );
        assert_eq!(
            find_port(&dir, "moat0").unwrap().as_deref(),
            Some("vport0p1")
        );
        assert_eq!(find_port(&dir, "mode").unwrap(), None);
        assert_eq!(find_port(&dir, "").unwrap(), None);
        fs::remove_dir_all(&dir).unwrap();
        assert!(find_port(&dir, "modem").is_err(), "no such directory");
    }
}
