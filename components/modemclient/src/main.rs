//! `modemclient`: drives the `modem` portal (at selector 20) as the
//! application processor would: `AT`, `AT+CSQ`, an SMS, a data call whose
//! packet comes back, `+++` and `ATH`, the two sessions kept apart, a
//! refused request and a session reset; prints `modemclient: ok <step>`
//! per step (or `modemclient: FAIL ...` and stops), then the modem's
//! STATUS.
//!
//! Arguments: `restarts=N frames=M` (default 0): then it stays (so the
//! root keeps the modem running) and polls STATUS until the modem was
//! restarted N times, reconnecting after each, and counts M frames.
#![no_std]
#![no_main]

use common::modem::{
    self, exchange, request, Error, ExchangeError, Reply, Request, SessionId, Stats,
};
use common::rt::Sleeper;
use common::{args, ms_to_ticks};
use moat_user::abi::Status;
use moat_user::{println, rdtsc, sys};

moat_user::entry!(main);

const MODEM: u64 = 20;
const SLEEP_SM: u64 = 40;
const POLL_MS: u64 = 50;
/// The longest watch, in the emulator's TSC time.
const WATCH_LIMIT_MS: u64 = 60_000;
const ANSWER_MAX: usize = 256;
const OK: &[u8] = b"OK\r\n";
const PACKET_LEN: usize = 100;
/// A data packet with every kind of byte that means something in command
/// mode (CR, LF, `+`, Ctrl-Z, ESC): in data mode they are just data.
const PACKET: [u8; PACKET_LEN] = packet();

const fn packet() -> [u8; PACKET_LEN] {
    let mut bytes = [0u8; PACKET_LEN];
    let mut i = 0;
    while i < PACKET_LEN {
        bytes[i] = (i as u8).wrapping_mul(37).wrapping_add(11);
        i += 1;
    }
    bytes
}

enum Want {
    Exactly(&'static [u8]),
    /// A line whose middle varies (a value), then `OK`.
    Framed(&'static [u8], &'static [u8]),
}

struct Step {
    name: &'static str,
    session: SessionId,
    input: &'static [u8],
    want: Want,
}

const fn step(name: &'static str, input: &'static [u8], want: Want) -> Step {
    Step {
        name,
        session: SessionId::Port,
        input,
        want,
    }
}

const STEPS: &[Step] = &[
    step("at", b"AT\r", Want::Exactly(OK)),
    step("csq", b"AT+CSQ\r", Want::Framed(b"+CSQ: ", b"\r\nOK\r\n")),
    step(
        "sms prompt",
        b"AT+CMGS=\"+15550100\"\r",
        Want::Exactly(b"> "),
    ),
    step(
        "sms",
        b"Hello from the application processor\x1a",
        Want::Framed(b"+CMGS: ", b"\r\nOK\r\n"),
    ),
    step(
        "context",
        b"AT+CGDCONT=1,\"IP\",\"internet\"\r",
        Want::Exactly(OK),
    ),
    step("dial", b"ATD*99#\r", Want::Exactly(b"CONNECT\r\n")),
    step("data echo", &PACKET, Want::Exactly(&PACKET)),
    step("escape", b"+++", Want::Exactly(OK)),
    step("hangup", b"ATH\r", Want::Exactly(OK)),
    step("unknown command", b"AT+NOPE\r", Want::Exactly(b"ERROR\r\n")),
    // Half a line on the hypercall session survives a whole command on
    // the port session.
    Step {
        session: SessionId::Hypercall,
        ..step("hypercall half line", b"AT+C", Want::Exactly(b""))
    },
    step("port meanwhile", b"AT\r", Want::Exactly(OK)),
    Step {
        session: SessionId::Hypercall,
        ..step(
            "hypercall line completes",
            b"SQ\r",
            Want::Framed(b"+CSQ: ", b"\r\nOK\r\n"),
        )
    },
];

fn main(args: &str) -> i32 {
    let (Ok(restarts), Ok(frames)) = (
        args::number(args, "restarts", 0),
        args::number(args, "frames", 0),
    ) else {
        println!("modemclient: FAIL bad arguments '{args}'");
        return 2;
    };
    let watching = restarts > 0 || frames > 0;
    let result = run().and_then(|stats| {
        if watching {
            watch(stats, restarts, frames, args::tsc_hz(args))
        } else {
            Ok(())
        }
    });
    match result {
        Ok(()) => {
            println!("modemclient: done");
            0
        }
        Err(why) => {
            println!("modemclient: FAIL {why}");
            1
        }
    }
}

fn call(words: [u64; 6]) -> Result<[u64; 6], Status> {
    sys::call(MODEM, words)
}

struct Failure {
    step: &'static str,
    why: Why,
}

enum Why {
    Exchange(ExchangeError<Status>),
    /// The start of a wrong answer.
    Answer(modem::Chunk),
    Reply(Result<Reply, Error>),
    SmsCount(u64),
    /// Restarts seen before the watch gave up.
    GaveUp(u64),
}

impl core::fmt::Display for Failure {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}: ", self.step)?;
        match &self.why {
            Why::Exchange(error) => write!(f, "{error:?}"),
            Why::Answer(start) => write!(f, "answered {start:?}"),
            Why::Reply(reply) => write!(f, "replied {reply:?}"),
            Why::SmsCount(n) => write!(f, "the modem counts {n} SMS, expected 1"),
            Why::GaveUp(seen) => write!(f, "gave up after {seen} restart(s)"),
        }
    }
}

fn run() -> Result<Stats, Failure> {
    for s in STEPS {
        let mut answer = [0u8; ANSWER_MAX];
        let len = exchange(&mut call, s.session, s.input, &mut answer).map_err(|e| Failure {
            step: s.name,
            why: Why::Exchange(e),
        })?;
        let got = &answer[..len];
        let matched = match s.want {
            Want::Exactly(want) => got == want,
            Want::Framed(head, tail) => {
                got.len() > head.len() + tail.len() && got.starts_with(head) && got.ends_with(tail)
            }
        };
        if !matched {
            return Err(Failure {
                step: s.name,
                why: Why::Answer(modem::Chunk::prefix(got)),
            });
        }
        match s.want {
            Want::Framed(..) => println!("modemclient: ok {} \"{}\"", s.name, got.escape_ascii()),
            Want::Exactly(_) => println!("modemclient: ok {}", s.name),
        }
    }
    refused()?;
    reset()?;
    status()
}

/// Malformed words get a typed refusal, and the modem serves on.
fn refused() -> Result<(), Failure> {
    let cases = [
        ([0x77, 0, 0, 0, 0, 0], Error::UnknownOp),
        ([1 | 1 << 40, 0, 0, 0, 0, 0], Error::ReservedBits),
        ([1 | 7 << 8, 0, 0, 0, 0, 0], Error::BadSession),
        ([1 | 41 << 16, 0, 0, 0, 0, 0], Error::BadCount),
        ([2, 0, 0, 0, 0, 1], Error::Padding),
    ];
    for (words, error) in cases {
        let reply = call(words).map_err(|e| Failure {
            step: "refused",
            why: Why::Exchange(ExchangeError::Call(e)),
        })?;
        let reply = Reply::decode(reply);
        if reply != Ok(Reply::Refused(error)) {
            return Err(Failure {
                step: "refused",
                why: Why::Reply(reply),
            });
        }
    }
    println!("modemclient: ok refused");
    Ok(())
}

/// A reset drops half a line: what follows is a line of its own.
fn reset() -> Result<(), Failure> {
    let fail = |why| Failure { step: "reset", why };
    let mut answer = [0u8; ANSWER_MAX];
    let session = SessionId::Port;
    exchange(&mut call, session, b"AT+CS", &mut answer).map_err(|e| fail(Why::Exchange(e)))?;
    match request(&mut call, Request::ResetSession { session }) {
        Ok(Reply::Reset { .. }) => {}
        Ok(other) => return Err(fail(Why::Reply(Ok(other)))),
        Err(error) => return Err(fail(Why::Exchange(error))),
    }
    let len =
        exchange(&mut call, session, b"Q\r", &mut answer).map_err(|e| fail(Why::Exchange(e)))?;
    if &answer[..len] != b"ERROR\r\n" {
        return Err(fail(Why::Answer(modem::Chunk::prefix(&answer[..len]))));
    }
    println!("modemclient: ok reset");
    Ok(())
}

fn query_status() -> Result<Stats, ExchangeError<Status>> {
    match request(
        &mut call,
        Request::Status {
            session: SessionId::Port,
        },
    )? {
        Reply::Status { stats, .. } => Ok(stats),
        _ => Err(ExchangeError::Unexpected),
    }
}

fn print_status(what: &str, stats: &Stats) {
    println!(
        "modemclient: {what} frames {}, missed {}, worst jitter {} ns, sms {}, instance {:#x}",
        stats.frames, stats.missed, stats.worst_jitter_ns, stats.sms_sent, stats.instance
    );
}

fn status() -> Result<Stats, Failure> {
    let fail = |why| Failure {
        step: "status",
        why,
    };
    let stats = query_status().map_err(|e| fail(Why::Exchange(e)))?;
    print_status("status", &stats);
    if stats.sms_sent != 1 {
        return Err(fail(Why::SmsCount(stats.sms_sent)));
    }
    Ok(stats)
}

/// Polls STATUS until the modem restarted `restarts` times (each time
/// reconnecting as the application processor does: RESET_SESSION, then
/// `AT`) and its current instance counts `frames` frames.
fn watch(first: Stats, restarts: u64, frames: u64, tsc_hz: u64) -> Result<(), Failure> {
    let fail = |why| Failure { step: "watch", why };
    let sleeper =
        Sleeper::new(SLEEP_SM).map_err(|e| fail(Why::Exchange(ExchangeError::Call(e))))?;
    let give_up = rdtsc().saturating_add(ms_to_ticks(tsc_hz, WATCH_LIMIT_MS));
    let (mut instance, mut seen) = (first.instance, 0);
    loop {
        let _ = sleeper.for_ticks(ms_to_ticks(tsc_hz, POLL_MS));
        if rdtsc() > give_up {
            return Err(fail(Why::GaveUp(seen)));
        }
        // While the modem is down the call fails: wait for its restart.
        let Ok(stats) = query_status() else {
            continue;
        };
        if stats.instance != instance {
            instance = stats.instance;
            seen += 1;
            println!("modemclient: the modem restarted (instance {instance:#x})");
            reconnect().map_err(fail)?;
            println!("modemclient: ok at after restart");
        }
        if seen >= restarts && stats.frames >= frames {
            print_status("final status", &stats);
            return Ok(());
        }
    }
}

fn reconnect() -> Result<(), Why> {
    let session = SessionId::Port;
    match request(&mut call, Request::ResetSession { session }) {
        Ok(Reply::Reset { .. }) => {}
        Ok(other) => return Err(Why::Reply(Ok(other))),
        Err(error) => return Err(Why::Exchange(error)),
    }
    let mut answer = [0u8; ANSWER_MAX];
    let len = exchange(&mut call, session, b"AT\r", &mut answer).map_err(Why::Exchange)?;
    if &answer[..len] != OK {
        return Err(Why::Answer(modem::Chunk::prefix(&answer[..len])));
    }
    Ok(())
}
