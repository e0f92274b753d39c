//! The modem's AT-command engine: one [`Session`] per channel turns the
//! application processor's bytes into response text. Pure logic over
//! bounded buffers: no allocation, and no input can make it panic.
//!
//! A session is in one of three modes:
//! - command: bytes gather into a line; CR, LF or CRLF ends it and runs it
//!   (`AT`, `AT+CSQ`, `AT+CMGS="<number>"`, `AT+CGDCONT=1,"IP","<apn>"`,
//!   `ATD*99#`, `ATO`, `ATH`; `AT+MOATFAULT` asks the modem to crash,
//!   for fault-injection demos, if its [`Events`] allow it; anything else
//!   is `ERROR`);
//! - SMS text, after `AT+CMGS`: the message until Ctrl-Z sends it or ESC
//!   cancels it;
//! - data, after `ATD*99#` answered `CONNECT`: bytes are echoed back (the
//!   simulated data call), until a write of exactly `+++` returns to
//!   command mode with the call still up.
//!
//! Every response line ends with CRLF. A write accepts bytes only while the
//! output has room for what they may produce; the rest waits for the
//! caller to read and write again.

use core::fmt::{self, Write};

/// Longest command line (without its terminator).
pub const LINE_MAX: usize = 128;
/// Longest SMS destination number, digits with an optional leading `+`.
pub const NUMBER_MAX: usize = 20;
/// Longest SMS text (one GSM 7-bit message).
pub const SMS_MAX: usize = 160;
/// Longest access point name.
pub const APN_MAX: usize = 63;
/// Response text a session holds until it is read.
pub const OUTPUT_CAP: usize = 512;
/// The most text one input byte can produce outside data mode (a
/// completed command's whole answer); a byte is taken only with this room.
pub const RESPONSE_MAX: usize = 32;
/// A write of exactly these bytes leaves data mode.
pub const DATA_ESCAPE: &[u8] = b"+++";
/// The one PDP context a data call may use.
pub const CONTEXT_ID: &[u8] = b"1";

const CR: u8 = b'\r';
const LF: u8 = b'\n';
const CTRL_Z: u8 = 0x1a;
const ESC: u8 = 0x1b;

const OK: &str = "OK\r\n";
const ERROR: &str = "ERROR\r\n";
const CONNECT: &str = "CONNECT\r\n";
const NO_CARRIER: &str = "NO CARRIER\r\n";
const PROMPT: &str = "> ";

/// The dial strings of a packet data call (`*99#`, or `*99***1#` naming
/// context 1).
const DIAL_STRINGS: [&[u8]; 2] = [b"D*99#", b"D*99***1#"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Command,
    SmsText,
    Data,
}

/// Received signal quality as `AT+CSQ` reports it (27.007: rssi 0–31,
/// ber 0–7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Signal {
    pub rssi: u8,
    pub ber: u8,
}

impl Signal {
    /// Frames per step of the simulated fading.
    pub const FRAMES_PER_STEP: u64 = 1000;
    const STEPS: u64 = 16;
    const RSSI_FLOOR: u64 = 10;
    const BER_LEVELS: u64 = 4;

    /// The simulated radio at frame `frame`: the rssi rises and falls by
    /// one a step (10..=18 over 16 steps), the ber cycles 0..=3.
    pub const fn at_frame(frame: u64) -> Self {
        let step = (frame / Self::FRAMES_PER_STEP) % Self::STEPS;
        let half = Self::STEPS / 2;
        let rise = if step < half {
            step
        } else {
            Self::STEPS - step
        };
        Self {
            rssi: (Self::RSSI_FLOOR + rise) as u8,
            ber: (step % Self::BER_LEVELS) as u8,
        }
    }
}

/// What a session reports beyond its response text.
pub trait Events {
    /// An SMS was sent: destination, text (line breaks as LF) and its
    /// message reference.
    fn sms_sent(&mut self, number: &[u8], text: &[u8], reference: u8);

    /// `AT+MOATFAULT`: true if the modem will crash on purpose (fault
    /// injection is on), false to answer `ERROR` like any unknown command.
    fn fault_requested(&mut self) -> bool {
        false
    }
}

/// The fault-injection command (without `AT`).
const FAULT_COMMAND: &[u8] = b"+MOATFAULT";

/// A byte string of at most `N` bytes.
#[derive(Clone, Copy)]
struct Bounded<const N: usize> {
    bytes: [u8; N],
    len: usize,
}

impl<const N: usize> Bounded<N> {
    const fn new() -> Self {
        Self {
            bytes: [0; N],
            len: 0,
        }
    }

    fn as_bytes(&self) -> &[u8] {
        self.bytes.get(..self.len).unwrap_or(&[])
    }

    /// False (and nothing stored) once full.
    fn push(&mut self, byte: u8) -> bool {
        match self.bytes.get_mut(self.len) {
            Some(slot) => {
                *slot = byte;
                self.len += 1;
                true
            }
            None => false,
        }
    }

    fn set(&mut self, bytes: &[u8]) -> bool {
        match self.bytes.get_mut(..bytes.len()) {
            Some(slot) => {
                slot.copy_from_slice(bytes);
                self.len = bytes.len();
                true
            }
            None => false,
        }
    }

    fn clear(&mut self) {
        self.len = 0;
    }
}

/// The response text not yet read: a ring of [`OUTPUT_CAP`] bytes.
struct Output {
    ring: [u8; OUTPUT_CAP],
    head: usize,
    len: usize,
}

impl Output {
    const fn new() -> Self {
        Self {
            ring: [0; OUTPUT_CAP],
            head: 0,
            len: 0,
        }
    }

    fn free(&self) -> usize {
        OUTPUT_CAP - self.len
    }

    /// Stores what fits; returns how much did.
    fn push(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(self.free());
        for &byte in &bytes[..n] {
            self.ring[(self.head + self.len) % OUTPUT_CAP] = byte;
            self.len += 1;
        }
        n
    }

    fn pop_into(&mut self, buf: &mut [u8]) -> usize {
        let n = buf.len().min(self.len);
        for slot in &mut buf[..n] {
            *slot = self.ring[self.head];
            self.head = (self.head + 1) % OUTPUT_CAP;
            self.len -= 1;
        }
        n
    }
}

impl Write for Output {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if self.push(s.as_bytes()) == s.len() {
            Ok(())
        } else {
            Err(fmt::Error)
        }
    }
}

/// One channel's modem state.
pub struct Session {
    mode: Mode,
    /// A data call is connected (in data mode, or in command mode after
    /// `+++`).
    call_up: bool,
    line: Bounded<LINE_MAX>,
    /// The line outgrew [`LINE_MAX`]: the rest of it is dropped and it
    /// answers `ERROR`.
    line_overflow: bool,
    /// The last byte was a CR ending a line (or a line of SMS text): an LF
    /// right after it belongs to the same line end, even if the line
    /// switched to data mode.
    after_cr: bool,
    number: Bounded<NUMBER_MAX>,
    text: Bounded<SMS_MAX>,
    /// The APN of context 1; empty while none is defined.
    apn: Bounded<APN_MAX>,
    next_reference: u8,
    sms_sent: u64,
    output: Output,
}

impl Default for Session {
    fn default() -> Self {
        Self::new()
    }
}

impl Session {
    pub const fn new() -> Self {
        Self {
            mode: Mode::Command,
            call_up: false,
            line: Bounded::new(),
            line_overflow: false,
            after_cr: false,
            number: Bounded::new(),
            text: Bounded::new(),
            apn: Bounded::new(),
            next_reference: 1,
            sms_sent: 0,
            output: Output::new(),
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn call_up(&self) -> bool {
        self.call_up
    }

    /// Response bytes waiting to be read.
    pub fn pending(&self) -> usize {
        self.output.len
    }

    /// SMS sent by this session since it was created (a reset keeps it).
    pub fn sms_sent(&self) -> u64 {
        self.sms_sent
    }

    /// The other side reconnected: back to command mode with no call and
    /// nothing buffered. The SMS count and message reference go on.
    pub fn reset(&mut self) {
        let (next_reference, sms_sent) = (self.next_reference, self.sms_sent);
        *self = Self::new();
        self.next_reference = next_reference;
        self.sms_sent = sms_sent;
    }

    /// Moves up to `buf.len()` response bytes into `buf`.
    pub fn read(&mut self, buf: &mut [u8]) -> usize {
        self.output.pop_into(buf)
    }

    /// Takes the bytes the output has room for; returns how many (a prefix
    /// of `bytes`: the caller reads the output and writes the rest again).
    pub fn write(&mut self, bytes: &[u8], signal: Signal, events: &mut impl Events) -> usize {
        if self.mode == Mode::Data && bytes == DATA_ESCAPE {
            if self.output.free() < RESPONSE_MAX {
                return 0;
            }
            self.mode = Mode::Command;
            self.respond(OK);
            return bytes.len();
        }
        let mut accepted = 0;
        for &byte in bytes {
            let room = match self.mode {
                Mode::Data => 1,
                Mode::Command | Mode::SmsText => RESPONSE_MAX,
            };
            if self.output.free() < room {
                break;
            }
            self.byte(byte, signal, events);
            accepted += 1;
        }
        accepted
    }

    fn byte(&mut self, byte: u8, signal: Signal, events: &mut impl Events) {
        if core::mem::replace(&mut self.after_cr, false) && byte == LF {
            return;
        }
        match self.mode {
            Mode::Command => self.command_byte(byte, signal, events),
            Mode::SmsText => self.text_byte(byte, events),
            Mode::Data => {
                self.output.push(&[byte]);
            }
        }
    }

    fn command_byte(&mut self, byte: u8, signal: Signal, events: &mut impl Events) {
        if byte == CR || byte == LF {
            self.after_cr = byte == CR;
            let line = self.line;
            let overflow = core::mem::replace(&mut self.line_overflow, false);
            self.line.clear();
            if overflow {
                self.respond(ERROR);
            } else {
                self.execute(line.as_bytes().trim_ascii(), signal, events);
            }
        } else if !self.line.push(byte) {
            self.line_overflow = true;
        }
    }

    fn text_byte(&mut self, byte: u8, events: &mut impl Events) {
        match byte {
            CTRL_Z => {
                let reference = self.next_reference;
                self.next_reference = reference.wrapping_add(1);
                self.sms_sent = self.sms_sent.wrapping_add(1);
                events.sms_sent(self.number.as_bytes(), self.text.as_bytes(), reference);
                let _ = write!(self.output, "+CMGS: {reference}\r\n{OK}");
                self.end_text();
            }
            ESC => {
                self.respond(OK);
                self.end_text();
            }
            _ => {
                self.after_cr = byte == CR;
                let byte = if byte == CR { LF } else { byte };
                if !self.text.push(byte) {
                    // A message without its Ctrl-Z: give up on it rather
                    // than swallow everything that follows.
                    self.respond(ERROR);
                    self.end_text();
                }
            }
        }
    }

    fn end_text(&mut self) {
        self.mode = Mode::Command;
        self.number.clear();
        self.text.clear();
    }

    fn respond(&mut self, text: &str) {
        self.output.push(text.as_bytes());
    }

    fn execute(&mut self, line: &[u8], signal: Signal, events: &mut impl Events) {
        if line.is_empty() {
            return;
        }
        let Some(command) = strip_prefix_ignore_case(line, b"AT") else {
            return self.respond(ERROR);
        };
        if command.is_empty() {
            self.respond(OK);
        } else if command.eq_ignore_ascii_case(b"+CSQ") {
            let Signal { rssi, ber } = signal;
            let _ = write!(self.output, "+CSQ: {rssi},{ber}\r\n{OK}");
        } else if let Some(argument) = strip_prefix_ignore_case(command, b"+CMGS=") {
            self.start_sms(argument);
        } else if let Some(argument) = strip_prefix_ignore_case(command, b"+CGDCONT=") {
            self.define_context(argument);
        } else if DIAL_STRINGS.iter().any(|d| command.eq_ignore_ascii_case(d)) {
            self.dial();
        } else if command.eq_ignore_ascii_case(b"O") {
            if self.call_up {
                self.mode = Mode::Data;
                self.respond(CONNECT);
            } else {
                self.respond(NO_CARRIER);
            }
        } else if command.eq_ignore_ascii_case(b"H") || command.eq_ignore_ascii_case(b"H0") {
            self.call_up = false;
            self.respond(OK);
        } else if command.eq_ignore_ascii_case(FAULT_COMMAND) && events.fault_requested() {
            // No answer: the modem is about to die.
        } else {
            self.respond(ERROR);
        }
    }

    /// `AT+CMGS="<number>"`: the text follows after the prompt.
    fn start_sms(&mut self, argument: &[u8]) {
        let number = match quoted(argument) {
            Some((number, b"")) if is_phone_number(number) => number,
            _ => return self.respond(ERROR),
        };
        if !self.number.set(number) {
            return self.respond(ERROR);
        }
        self.text.clear();
        self.mode = Mode::SmsText;
        self.respond(PROMPT);
    }

    /// `AT+CGDCONT=1,"IP","<apn>"`.
    fn define_context(&mut self, argument: &[u8]) {
        let Some((cid, rest)) = split_once(argument, b',') else {
            return self.respond(ERROR);
        };
        let Some((pdp_type, rest)) = quoted(rest) else {
            return self.respond(ERROR);
        };
        let apn = match rest.strip_prefix(b",").and_then(quoted) {
            Some((apn, b"")) if is_apn(apn) => apn,
            _ => return self.respond(ERROR),
        };
        if cid != CONTEXT_ID || !pdp_type.eq_ignore_ascii_case(b"IP") || !self.apn.set(apn) {
            return self.respond(ERROR);
        }
        self.respond(OK);
    }

    fn dial(&mut self) {
        if self.call_up {
            self.respond(ERROR);
        } else if self.apn.as_bytes().is_empty() {
            self.respond(NO_CARRIER);
        } else {
            self.call_up = true;
            self.mode = Mode::Data;
            self.respond(CONNECT);
        }
    }
}

fn strip_prefix_ignore_case<'a>(bytes: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    let head = bytes.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &bytes[prefix.len()..])
}

fn split_once(bytes: &[u8], separator: u8) -> Option<(&[u8], &[u8])> {
    let at = bytes.iter().position(|&b| b == separator)?;
    Some((&bytes[..at], &bytes[at + 1..]))
}

/// `"inside"rest` → `(inside, rest)`.
fn quoted(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    split_once(bytes.strip_prefix(b"\"")?, b'"')
}

fn is_phone_number(number: &[u8]) -> bool {
    let digits = number.strip_prefix(b"+").unwrap_or(number);
    !digits.is_empty() && number.len() <= NUMBER_MAX && digits.iter().all(u8::is_ascii_digit)
}

fn is_apn(apn: &[u8]) -> bool {
    !apn.is_empty()
        && apn.len() <= APN_MAX
        && apn
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Xorshift;

    /// Bytes per protocol call.
    const DATA_LEN: usize = 40;

    #[derive(Default)]
    struct Log(Vec<(Vec<u8>, Vec<u8>, u8)>);

    impl Events for Log {
        fn sms_sent(&mut self, number: &[u8], text: &[u8], reference: u8) {
            self.0.push((number.to_vec(), text.to_vec(), reference));
        }
    }

    /// Events of a modem with fault injection on: counts the requests.
    #[derive(Default)]
    struct Faulty(u32);

    impl Events for Faulty {
        fn sms_sent(&mut self, _: &[u8], _: &[u8], _: u8) {}

        fn fault_requested(&mut self) -> bool {
            self.0 += 1;
            true
        }
    }

    #[test]
    fn fault_command_only_where_allowed() {
        let (mut s, mut log) = session();
        assert_eq!(talk(&mut s, &mut log, b"AT+MOATFAULT\r"), "ERROR\r\n");
        let mut faulty = Faulty::default();
        let mut out = [0u8; 16];
        assert_eq!(s.write(b"at+moatfault\r", SIGNAL, &mut faulty), 13);
        assert_eq!(s.read(&mut out), 0, "a dying modem answers nothing");
        assert_eq!(faulty.0, 1);
        // Only the exact command: no prefix or suffix triggers it.
        assert_eq!(
            s.write(b"AT+MOATFAULT1\rAT+MOATFAUL\r", SIGNAL, &mut faulty),
            26
        );
        assert_eq!(faulty.0, 1);
    }

    const SIGNAL: Signal = Signal { rssi: 17, ber: 2 };

    /// Writes all of `input` (reading in between when the output is full)
    /// and returns everything answered.
    fn talk(session: &mut Session, log: &mut Log, input: &[u8]) -> String {
        String::from_utf8_lossy(&talk_bytes(session, log, input)).into_owned()
    }

    fn talk_bytes(session: &mut Session, log: &mut Log, input: &[u8]) -> Vec<u8> {
        let mut answer = Vec::new();
        let mut rest = input;
        loop {
            let n = session.write(rest, SIGNAL, log);
            rest = &rest[n..];
            let mut buf = [0u8; 64];
            loop {
                let got = session.read(&mut buf);
                if got == 0 {
                    break;
                }
                answer.extend_from_slice(&buf[..got]);
            }
            if rest.is_empty() {
                return answer;
            }
            assert!(n > 0, "stalled with an empty output");
        }
    }

    fn session() -> (Session, Log) {
        (Session::new(), Log::default())
    }

    #[test]
    fn basic_commands_and_line_ends() {
        let (mut s, mut log) = session();
        assert_eq!(talk(&mut s, &mut log, b"AT\r"), "OK\r\n");
        assert_eq!(talk(&mut s, &mut log, b"at\n"), "OK\r\n");
        // CRLF is one line end, and empty lines answer nothing.
        assert_eq!(talk(&mut s, &mut log, b"AT\r\n\r\n\n"), "OK\r\n");
        assert_eq!(talk(&mut s, &mut log, b"AT+CSQ\r"), "+CSQ: 17,2\r\nOK\r\n");
        assert_eq!(talk(&mut s, &mut log, b"ATZZ\r"), "ERROR\r\n");
        assert_eq!(talk(&mut s, &mut log, b"hello\r"), "ERROR\r\n");
        assert_eq!(talk(&mut s, &mut log, b"  AT  \r"), "OK\r\n");
    }

    #[test]
    fn a_line_may_span_many_writes() {
        let (mut s, mut log) = session();
        for chunk in [&b"A"[..], b"T+", b"C", b"SQ"] {
            assert_eq!(s.write(chunk, SIGNAL, &mut log), chunk.len());
            assert_eq!(s.pending(), 0, "answered before the line ended");
        }
        assert_eq!(talk(&mut s, &mut log, b"\r"), "+CSQ: 17,2\r\nOK\r\n");
    }

    #[test]
    fn overlong_lines_are_rejected_once() {
        let (mut s, mut log) = session();
        let mut line = b"AT".to_vec();
        line.extend(core::iter::repeat_n(b'X', 3 * LINE_MAX));
        line.push(CR);
        assert_eq!(talk(&mut s, &mut log, &line), "ERROR\r\n");
        assert_eq!(talk(&mut s, &mut log, b"AT\r"), "OK\r\n");
        // Exactly LINE_MAX bytes still fit.
        let mut fits = b"AT".to_vec();
        fits.extend(core::iter::repeat_n(b' ', LINE_MAX - 2));
        fits.push(CR);
        assert_eq!(talk(&mut s, &mut log, &fits), "OK\r\n");
    }

    #[test]
    fn sms_is_sent_on_ctrl_z() {
        let (mut s, mut log) = session();
        assert_eq!(talk(&mut s, &mut log, b"AT+CMGS=\"+15550100\"\r\n"), "> ");
        assert_eq!(s.mode(), Mode::SmsText);
        assert_eq!(talk(&mut s, &mut log, b"Hello\r\nMoat"), "");
        assert_eq!(talk(&mut s, &mut log, b"\x1a"), "+CMGS: 1\r\nOK\r\n");
        assert_eq!(log.0, [(b"+15550100".to_vec(), b"Hello\nMoat".to_vec(), 1)]);
        assert_eq!(
            talk(&mut s, &mut log, b"AT+CMGS=\"5\"\rx\x1a"),
            "> +CMGS: 2\r\nOK\r\n"
        );
        assert_eq!(s.sms_sent(), 2);
        assert_eq!(s.mode(), Mode::Command);
    }

    #[test]
    fn sms_cancelled_or_without_ctrl_z() {
        let (mut s, mut log) = session();
        assert_eq!(
            talk(&mut s, &mut log, b"AT+CMGS=\"123\"\rnot this\x1b"),
            "> OK\r\n"
        );
        assert_eq!(s.mode(), Mode::Command);
        // Longer than one SMS and no Ctrl-Z: ERROR, then commands again.
        talk(&mut s, &mut log, b"AT+CMGS=\"123\"\r");
        let text = vec![b'x'; SMS_MAX + 1];
        assert_eq!(talk(&mut s, &mut log, &text), "ERROR\r\n");
        assert_eq!(s.mode(), Mode::Command);
        assert_eq!(talk(&mut s, &mut log, b"AT\r"), "OK\r\n");
        assert!(log.0.is_empty());
        // Exactly SMS_MAX bytes is a message.
        talk(&mut s, &mut log, b"AT+CMGS=\"123\"\r");
        let mut text = vec![b'y'; SMS_MAX];
        text.push(CTRL_Z);
        assert_eq!(talk(&mut s, &mut log, &text), "+CMGS: 1\r\nOK\r\n");
        assert_eq!(log.0[0].1.len(), SMS_MAX);
    }

    #[test]
    fn bad_sms_numbers() {
        let (mut s, mut log) = session();
        for bad in [
            &b"AT+CMGS=\"\"\r"[..],
            b"AT+CMGS=\"+\"\r",
            b"AT+CMGS=\"12a\"\r",
            b"AT+CMGS=123\r",
            b"AT+CMGS=\"123\r",
            b"AT+CMGS=\"123\",145\r",
            b"AT+CMGS=\"123456789012345678901\"\r",
        ] {
            assert_eq!(talk(&mut s, &mut log, bad), "ERROR\r\n", "{bad:?}");
            assert_eq!(s.mode(), Mode::Command);
        }
    }

    #[test]
    fn data_call_echoes_until_escape() {
        let (mut s, mut log) = session();
        assert_eq!(talk(&mut s, &mut log, b"ATD*99#\r"), "NO CARRIER\r\n");
        assert_eq!(
            talk(
                &mut s,
                &mut log,
                b"AT+CGDCONT=1,\"IP\",\"internet.example\"\r"
            ),
            "OK\r\n"
        );
        // The LF of the dial's CRLF is no data; what follows is.
        assert_eq!(
            talk(&mut s, &mut log, b"ATD*99#\r\n\x00ab"),
            "CONNECT\r\n\x00ab"
        );
        assert_eq!(s.mode(), Mode::Data);
        let packet: Vec<u8> = (0..=255).collect();
        assert_eq!(talk_bytes(&mut s, &mut log, &packet), packet);
        // `+++` inside a bigger write is data.
        assert_eq!(talk(&mut s, &mut log, b"+++AT\r"), "+++AT\r");
        assert_eq!(talk(&mut s, &mut log, b"+++"), "OK\r\n");
        assert_eq!((s.mode(), s.call_up()), (Mode::Command, true));
        assert_eq!(talk(&mut s, &mut log, b"ATD*99#\r"), "ERROR\r\n");
        assert_eq!(talk(&mut s, &mut log, b"ATO\r"), "CONNECT\r\n");
        assert_eq!(talk(&mut s, &mut log, b"ping"), "ping");
        assert_eq!(talk(&mut s, &mut log, b"+++"), "OK\r\n");
        assert_eq!(talk(&mut s, &mut log, b"ATH\r"), "OK\r\n");
        assert!(!s.call_up());
        assert_eq!(talk(&mut s, &mut log, b"ATO\r"), "NO CARRIER\r\n");
        assert_eq!(talk(&mut s, &mut log, b"ATD*99***1#\r"), "CONNECT\r\n");
        assert_eq!(talk(&mut s, &mut log, b"+++"), "OK\r\n");
        // `+++` in command mode is just the start of a bad line.
        assert_eq!(talk(&mut s, &mut log, b"+++"), "");
        assert_eq!(talk(&mut s, &mut log, b"\r"), "ERROR\r\n");
        assert_eq!(s.mode(), Mode::Command);
    }

    #[test]
    fn bad_contexts() {
        let (mut s, mut log) = session();
        for bad in [
            &b"AT+CGDCONT=2,\"IP\",\"apn\"\r"[..],
            b"AT+CGDCONT=1,\"PPP\",\"apn\"\r",
            b"AT+CGDCONT=1,\"IP\",\"\"\r",
            b"AT+CGDCONT=1,\"IP\",\"a b\"\r",
            b"AT+CGDCONT=1,\"IP\",\"apn\",0\r",
            b"AT+CGDCONT=1,\"IP\"\r",
            b"AT+CGDCONT=1\r",
            b"AT+CGDCONT=\r",
        ] {
            assert_eq!(talk(&mut s, &mut log, bad), "ERROR\r\n", "{bad:?}");
        }
        assert_eq!(talk(&mut s, &mut log, b"ATD*99#\r"), "NO CARRIER\r\n");
        assert_eq!(
            talk(&mut s, &mut log, b"at+cgdcont=1,\"ip\",\"APN\"\r"),
            "OK\r\n"
        );
    }

    #[test]
    fn a_full_output_holds_input_back() {
        let (mut s, mut log) = session();
        talk(&mut s, &mut log, b"AT+CGDCONT=1,\"IP\",\"apn\"\rATD*99#\r");
        let big = vec![0x55u8; OUTPUT_CAP + 100];
        assert_eq!(s.write(&big, SIGNAL, &mut log), OUTPUT_CAP);
        assert_eq!(s.write(&big, SIGNAL, &mut log), 0);
        assert_eq!(s.write(DATA_ESCAPE, SIGNAL, &mut log), 0, "no room for OK");
        let mut buf = [0u8; 100];
        assert_eq!(s.read(&mut buf), 100);
        assert_eq!(s.write(DATA_ESCAPE, SIGNAL, &mut log), 3);
        // Command bytes need room for a whole answer.
        let (mut s, mut log) = session();
        let many = b"AT\r".repeat(OUTPUT_CAP);
        let n = s.write(&many, SIGNAL, &mut log);
        assert!(n < many.len() && s.pending() + RESPONSE_MAX > OUTPUT_CAP);
        assert_eq!(s.pending(), n / 3 * OK.len());
    }

    #[test]
    fn reset_drops_everything_but_the_count() {
        let (mut s, mut log) = session();
        talk(&mut s, &mut log, b"AT+CMGS=\"1\"\rx\x1a");
        s.write(b"AT+CMGS=\"1\"\rhalf a messa", SIGNAL, &mut log);
        assert!(s.pending() > 0);
        s.reset();
        assert_eq!((s.mode(), s.pending(), s.sms_sent()), (Mode::Command, 0, 1));
        assert_eq!(talk(&mut s, &mut log, b"ge\x1a\r"), "ERROR\r\n");
        assert_eq!(
            talk(&mut s, &mut log, b"AT+CMGS=\"1\"\ry\x1a"),
            "> +CMGS: 2\r\nOK\r\n"
        );
    }

    #[test]
    fn signal_is_deterministic_and_in_range() {
        assert_eq!(Signal::at_frame(0), Signal { rssi: 10, ber: 0 });
        assert_eq!(Signal::at_frame(999), Signal::at_frame(0));
        assert_eq!(Signal::at_frame(1000), Signal { rssi: 11, ber: 1 });
        assert_eq!(Signal::at_frame(8000), Signal { rssi: 18, ber: 0 });
        for frame in (0..40_000).step_by(250).chain([u64::MAX]) {
            let Signal { rssi, ber } = Signal::at_frame(frame);
            assert!((10..=18).contains(&rssi) && ber <= 3);
        }
    }

    /// A random stream of commands, SMS text and noise, cut into random
    /// chunks (lines span writes), with reads, resets and lone `+++`
    /// writes in between: no panic, every write takes a prefix, the
    /// buffers stay bounded, and every mode is reached.
    #[test]
    fn fuzz_random_chunks() {
        const TOKENS: [&[u8]; 12] = [
            b"AT\r",
            b"AT+CSQ\r\n",
            b"AT+CMGS=\"+1555\"\r",
            b"AT+CGDCONT=1,\"IP\",\"apn\"\r",
            b"ATD*99#\r",
            b"ATH\r",
            b"ATO\r",
            b"\x1a",
            b"\x1b",
            b"\r",
            b"\n",
            b"text",
        ];
        let mut rng = Xorshift::new(0x00de_c0de);
        let mut s = Session::new();
        let mut log = Log::default();
        let mut stream: Vec<u8> = Vec::new();
        let mut modes = [0usize; 3];
        for _ in 0..30_000 {
            while stream.len() < DATA_LEN {
                if rng.one_in(4) {
                    stream.push(rng.next_u64() as u8);
                } else {
                    stream.extend_from_slice(TOKENS[rng.below(TOKENS.len() as u64) as usize]);
                }
            }
            match rng.below(20) {
                0 => s.reset(),
                1 => {
                    let n = s.write(DATA_ESCAPE, Signal::at_frame(rng.next_u64()), &mut log);
                    assert!(n == 0 || n == DATA_ESCAPE.len());
                }
                2..=8 => {
                    let mut buf = [0u8; DATA_LEN];
                    let before = s.pending();
                    let got = s.read(&mut buf[..rng.below(DATA_LEN as u64 + 1) as usize]);
                    assert_eq!(s.pending(), before - got);
                }
                _ => {
                    let len = rng.below(DATA_LEN as u64 + 1) as usize;
                    let n = s.write(&stream[..len], Signal::at_frame(rng.next_u64()), &mut log);
                    assert!(n <= len);
                    stream.drain(..n);
                }
            }
            assert!(s.pending() <= OUTPUT_CAP);
            assert!(s.line.len <= LINE_MAX && s.text.len <= SMS_MAX);
            assert!(s.number.len <= NUMBER_MAX && s.apn.len <= APN_MAX);
            modes[s.mode() as usize] += 1;
        }
        assert!(
            modes.iter().all(|&n| n > 100),
            "every mode reached: {modes:?}"
        );
        assert!(log.0.len() > 10, "SMS got through: {}", log.0.len());
    }
}
