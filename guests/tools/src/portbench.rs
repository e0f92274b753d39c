//! `portbench`: round trips of one AT command over a virtio-console port
//! (guest driver, the VMM's device model, its relay to the native modem
//! and back). The command line and one round trip over a blocking port,
//! built on the AT conversation of [`crate::at`].

use std::fmt;
use std::io::{self, ErrorKind, Read, Write};

use crate::args::{Parsed, UsageError, Word, Words};
use crate::at::{Event, Exchange, Outcome, Request, DEFAULT_PORT};
use crate::stats::Summary;

pub const DEFAULT_CALLS: usize = 100;
/// Every sample is kept (8 bytes each) until the end.
const MAX_CALLS: usize = 10_000_000;
/// Untimed round trips first: input left on the port by an earlier client
/// ends one of them early instead of a timed one.
pub const WARMUP: u64 = 10;
/// The command sent; its final result must be `OK`.
pub const COMMAND: &str = "AT";

#[derive(Debug, PartialEq, Eq)]
pub struct Options {
    pub calls: usize,
    pub port: String,
}

impl Options {
    /// `[--calls N] [--port NAME]`.
    pub fn parse(args: &[String]) -> Result<Parsed<Options>, UsageError> {
        let mut opts = Options {
            calls: DEFAULT_CALLS,
            port: DEFAULT_PORT.to_string(),
        };
        let mut words = Words::new(args);
        while let Some(word) = words.next_word() {
            match word {
                Word::Help => return Ok(Parsed::Help),
                Word::Flag("calls", v) => opts.calls = words.number("calls", v, 1..=MAX_CALLS)?,
                Word::Flag("port", v) => opts.port = words.value("port", v)?.to_string(),
                Word::Flag(name, _) => return Err(UsageError::unknown_flag(name)),
                Word::Positional(p) => return Err(UsageError(format!("unexpected `{p}`"))),
            }
        }
        if opts.port.is_empty() {
            return Err(UsageError("--port needs a name".into()));
        }
        Ok(Parsed::Run(opts))
    }
}

/// Why a round trip failed.
#[derive(Debug)]
pub enum Failure {
    Io(io::Error),
    /// A read gave end of input: nobody is connected on the host side.
    Closed,
    /// A final result other than `OK`, with the lines before it.
    Refused(Vec<String>),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Io(e) => write!(f, "{e}"),
            Failure::Closed => write!(f, "end of input: the host side is not connected"),
            Failure::Refused(lines) => write!(f, "answered `{}`", lines.join(" ")),
        }
    }
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Failure {
        Failure::Io(e)
    }
}

/// The request every round trip sends.
pub fn request() -> Request {
    Request::Command(COMMAND.to_string())
}

/// One round trip over `port`, opened blocking: writes the command with
/// its CR and reads until the final result, which must be `OK`. The
/// modem's echo of the command and any other lines are skipped.
pub fn round_trip<P: Read + Write>(port: &mut P, request: &Request) -> Result<(), Failure> {
    let (mut exchange, sent) = Exchange::start(request);
    port.write_all(&sent)?;
    let mut lines = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        let n = match port.read(&mut buf) {
            Ok(0) => return Err(Failure::Closed),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        for event in exchange.feed(buf.get(..n).unwrap_or(&buf)) {
            match event {
                Event::Line(line) => lines.push(line),
                Event::Done(Outcome::Ok) => return Ok(()),
                Event::Done(_) => return Err(Failure::Refused(lines)),
                // Only an SMS sends more at a prompt.
                Event::Send(_) => {}
            }
        }
    }
}

/// The result line, parsed by the benchmark harness.
pub fn report(s: &Summary) -> String {
    format!(
        "portbench: {} round trips, median {} cycles, min {} cycles",
        s.count, s.median, s.min
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::line;
    use std::collections::VecDeque;

    fn parse(args: &[&str]) -> Result<Parsed<Options>, UsageError> {
        Options::parse(&line(args))
    }

    #[test]
    fn parses_options() {
        assert_eq!(
            parse(&[]),
            Ok(Parsed::Run(Options {
                calls: DEFAULT_CALLS,
                port: "modem".into()
            }))
        );
        assert_eq!(
            parse(&["--calls", "5", "--port=m2"]),
            Ok(Parsed::Run(Options {
                calls: 5,
                port: "m2".into()
            }))
        );
        assert_eq!(parse(&["--help"]), Ok(Parsed::Help));
        for bad in [
            &["--calls", "0"][..],
            &["--calls", "x"],
            &["--port", ""],
            &["--port"],
            &["AT"],
            &["--bogus"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    /// A blocking port: each line written (up to CR) is answered with the
    /// next scripted reply, handed out a few bytes per read; reading with
    /// nothing to give is end of input (a real one would block for ever).
    struct ScriptedPort {
        replies: VecDeque<&'static [u8]>,
        incoming: VecDeque<u8>,
        written: Vec<u8>,
        interrupt_next_read: bool,
    }

    impl ScriptedPort {
        fn new(replies: &[&'static [u8]]) -> Self {
            ScriptedPort {
                replies: replies.iter().copied().collect(),
                incoming: VecDeque::new(),
                written: Vec::new(),
                interrupt_next_read: true,
            }
        }
    }

    impl Read for ScriptedPort {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if std::mem::take(&mut self.interrupt_next_read) {
                return Err(ErrorKind::Interrupted.into());
            }
            let n = self.incoming.len().min(buf.len()).min(3);
            for b in buf.iter_mut().take(n) {
                *b = self.incoming.pop_front().unwrap_or_default();
            }
            Ok(n)
        }
    }

    impl Write for ScriptedPort {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            for &b in buf {
                self.written.push(b);
                if b == b'\r' {
                    let reply = self.replies.pop_front().unwrap_or_default();
                    self.incoming.extend(reply);
                }
            }
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn round_trips_end_at_ok_and_skip_the_echo() {
        let mut port = ScriptedPort::new(&[b"AT\r\r\nOK\r\n", b"\r\nOK\r\n"]);
        let req = request();
        round_trip(&mut port, &req).unwrap();
        assert!(port.incoming.is_empty(), "read up to the final result");
        round_trip(&mut port, &req).unwrap();
        assert_eq!(port.written, b"AT\rAT\r");
    }

    #[test]
    fn other_results_and_silence_fail() {
        let req = request();
        let mut port = ScriptedPort::new(&[b"AT\r\r\n+CME ERROR: 3\r\n"]);
        match round_trip(&mut port, &req) {
            Err(Failure::Refused(lines)) => assert_eq!(lines, ["+CME ERROR: 3"]),
            other => panic!("{other:?}"),
        }
        // An answer cut off before its final result, then end of input.
        let mut port = ScriptedPort::new(&[b"AT\r\r\nO"]);
        let err = round_trip(&mut port, &req).unwrap_err();
        assert!(matches!(err, Failure::Closed));
        assert_eq!(
            err.to_string(),
            "end of input: the host side is not connected"
        );
        assert_eq!(
            Failure::Refused(vec!["ERROR".into()]).to_string(),
            "answered `ERROR`"
        );
    }

    #[test]
    fn report_line() {
        let s = Summary::of(&mut [5, 9, 7, 6]).unwrap();
        assert_eq!(
            report(&s),
            "portbench: 4 round trips, median 6 cycles, min 5 cycles"
        );
    }
}
