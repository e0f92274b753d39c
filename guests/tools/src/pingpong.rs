//! `pingpong`: a one-byte ping-pong between two processes over a pair of
//! pipes, the Linux round trip that Moat's IPC figures are read against.
//! The parent writes a ball, the child answers it plus one; the command
//! line, both sides of the exchange and the result line live here.

use std::io::{self, ErrorKind, Read, Write};

use crate::args::{Parsed, UsageError, Word, Words};
use crate::stats::Summary;

pub const DEFAULT_CALLS: usize = 1000;
/// Every sample is kept (8 bytes each) until the end.
const MAX_CALLS: usize = 10_000_000;
/// Untimed round trips first: the child's start-up and the first faults
/// on the pipes' pages are not what is measured.
pub const WARMUP: u64 = 100;
/// The argument that makes the program the answering side.
pub const CHILD_FLAG: &str = "--child";

#[derive(Debug, PartialEq, Eq)]
pub enum Role {
    /// Starts the child and times `calls` round trips.
    Parent { calls: usize },
    /// Answers balls on stdin until end of input.
    Child,
}

impl Role {
    /// `[--calls N] | --child`.
    pub fn parse(args: &[String]) -> Result<Parsed<Role>, UsageError> {
        let mut calls = DEFAULT_CALLS;
        let mut child = false;
        let mut words = Words::new(args);
        while let Some(word) = words.next_word() {
            match word {
                Word::Help => return Ok(Parsed::Help),
                Word::Flag("calls", v) => calls = words.number("calls", v, 1..=MAX_CALLS)?,
                Word::Flag("child", None) => child = true,
                Word::Flag(name, _) => return Err(UsageError::unknown_flag(name)),
                Word::Positional(p) => return Err(UsageError(format!("unexpected `{p}`"))),
            }
        }
        Ok(Parsed::Run(if child {
            Role::Child
        } else {
            Role::Parent { calls }
        }))
    }
}

/// The byte sent in round trip `round`: it changes every time, so a stale
/// or repeated answer shows.
pub fn ball(round: u64) -> u8 {
    round.to_le_bytes()[0]
}

/// What the child answers to `ball`.
pub fn answer(ball: u8) -> u8 {
    ball.wrapping_add(1)
}

/// The child's side: answers every byte of `input` on `output` at once
/// (`output` must not buffer); returns the count at end of input.
pub fn serve(input: &mut impl Read, output: &mut impl Write) -> io::Result<u64> {
    let mut served = 0;
    let mut byte = [0u8; 1];
    loop {
        match input.read(&mut byte) {
            Ok(0) => return Ok(served),
            Ok(_) => {
                output.write_all(&[answer(byte[0])])?;
                served += 1;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// The parent's side of round trip `round`: sends its ball and waits for
/// the answer.
pub fn volley(to: &mut impl Write, from: &mut impl Read, round: u64) -> Result<(), String> {
    let sent = ball(round);
    to.write_all(&[sent])
        .map_err(|e| format!("round {round}: write: {e}"))?;
    let mut got = [0u8; 1];
    from.read_exact(&mut got).map_err(|e| match e.kind() {
        ErrorKind::UnexpectedEof => format!("round {round}: the child closed its end"),
        _ => format!("round {round}: read: {e}"),
    })?;
    if got[0] != answer(sent) {
        return Err(format!(
            "round {round}: sent {sent:#04x}, got {:#04x}, want {:#04x}",
            got[0],
            answer(sent)
        ));
    }
    Ok(())
}

/// The result line, parsed by the benchmark harness.
pub fn report(s: &Summary) -> String {
    format!(
        "pingpong: {} round trips, median {} cycles, min {} cycles",
        s.count, s.median, s.min
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::line;
    use std::thread;

    fn parse(args: &[&str]) -> Result<Parsed<Role>, UsageError> {
        Role::parse(&line(args))
    }

    #[test]
    fn parses_roles() {
        assert_eq!(
            parse(&[]),
            Ok(Parsed::Run(Role::Parent {
                calls: DEFAULT_CALLS
            }))
        );
        assert_eq!(
            parse(&["--calls=7"]),
            Ok(Parsed::Run(Role::Parent { calls: 7 }))
        );
        assert_eq!(parse(&[CHILD_FLAG]), Ok(Parsed::Run(Role::Child)));
        assert_eq!(parse(&["-h"]), Ok(Parsed::Help));
        for bad in [
            &["--calls", "0"][..],
            &["--calls"],
            &["--child=1"],
            &["--bogus"],
            &["x"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn balls_change_every_round_and_wrap() {
        assert_eq!(ball(0), 0);
        assert_eq!(ball(1), 1);
        assert_eq!(ball(256), 0);
        assert_ne!(ball(41), ball(42));
        assert_eq!(answer(0xff), 0);
        assert_eq!(answer(7), 8);
    }

    #[test]
    fn child_answers_each_byte_until_end_of_input() {
        let mut out = Vec::new();
        assert_eq!(serve(&mut &[1u8, 2, 0xff][..], &mut out).unwrap(), 3);
        assert_eq!(out, [2, 3, 0]);
        assert_eq!(serve(&mut &[][..], &mut out).unwrap(), 0);
    }

    #[test]
    fn parent_and_child_play_over_real_pipes() {
        let (mut child_in, mut to_child) = io::pipe().unwrap();
        let (mut from_child, mut child_out) = io::pipe().unwrap();
        let child = thread::spawn(move || serve(&mut child_in, &mut child_out).unwrap());
        for round in 0..1000 {
            volley(&mut to_child, &mut from_child, round).unwrap();
        }
        drop(to_child);
        assert_eq!(child.join().unwrap(), 1000);
        let err = volley(&mut io::sink(), &mut from_child, 5).unwrap_err();
        assert!(err.contains("closed"), "{err}");
    }

    #[test]
    fn a_wrong_answer_is_reported() {
        let err = volley(&mut io::sink(), &mut &[9u8][..], 3).unwrap_err();
        assert_eq!(err, "round 3: sent 0x03, got 0x09, want 0x04");
        volley(&mut io::sink(), &mut &[4u8][..], 3).unwrap();
    }

    #[test]
    fn report_line() {
        let s = Summary::of(&mut [30, 10, 20]).unwrap();
        assert_eq!(
            report(&s),
            "pingpong: 3 round trips, median 20 cycles, min 10 cycles"
        );
    }
}
