//! The `modem` portal's protocol. A request and its reply each fit the six
//! message words of one IPC call — the same six registers the guest IPC
//! hypercall carries (`rdi`, `rsi`, `rdx`, `r10`, `r8`, `r9`).
//!
//! Word 0 of a request: bits 0–7 operation, 8–15 session, 16–23 byte
//! count, 24–63 zero. Word 0 of a reply: bits 0–7 operation, 8–15 session,
//! 16–23 byte count, 24–31 status (0, or an [`Error`] code), 32–47 response
//! bytes still pending in the session, 48–63 zero. Words 1–5 carry up to
//! [`DATA_MAX`] bytes, little-endian in word order; bytes past the count
//! are zero.
//!
//! | operation | request | reply |
//! | --- | --- | --- |
//! | `WRITE` (1) | count bytes from the application processor | count = bytes accepted; write the rest again after a `READ` |
//! | `READ` (2) | — | count bytes of response text |
//! | `STATUS` (3) | — | words 1–5: frames, missed deadlines, worst release jitter (ns), SMS sent, instance |
//! | `RESET_SESSION` (4) | — | — (the other side reconnected: the session starts afresh) |
//!
//! A refused request is answered with its [`Error`] as status and every
//! other field zero. Each [`SessionId`] is its own AT session, so the
//! virtio-console path (through the VMM) and the hypercall path never mix.
//!
//! Also here: [`Modem`], the server side over the AT engine
//! ([`crate::modem_at`]); [`exchange`], the client side; and [`FrameClock`],
//! the arithmetic of the modem's periodic frame tick.

use core::fmt;

use crate::modem_at::{Events, Session, Signal};

/// Data bytes in words 1–5.
pub const DATA_MAX: usize = 40;
const DATA_WORDS: usize = DATA_MAX / 8;

const OP_SHIFT: u32 = 0;
const SESSION_SHIFT: u32 = 8;
const COUNT_SHIFT: u32 = 16;
const STATUS_SHIFT: u32 = 24;
const PENDING_SHIFT: u32 = 32;
const BYTE: u64 = 0xff;
const PENDING_MASK: u64 = 0xffff;
const REQUEST_RESERVED: u64 = !0 << STATUS_SHIFT;
const REPLY_RESERVED: u64 = !0 << 48;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    Write = 1,
    Read = 2,
    Status = 3,
    ResetSession = 4,
}

impl Op {
    pub const fn from_u8(value: u8) -> Option<Self> {
        match value {
            1 => Some(Self::Write),
            2 => Some(Self::Read),
            3 => Some(Self::Status),
            4 => Some(Self::ResetSession),
            _ => None,
        }
    }
}

/// Which AT session a request is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum SessionId {
    /// The guest's virtio-console port `modem`, relayed by the VMM.
    Port = 0,
    /// The guest IPC hypercall.
    Hypercall = 1,
}

pub const SESSIONS: usize = 2;

impl SessionId {
    pub const fn from_u8(value: u8) -> Option<Self> {
        match value {
            0 => Some(Self::Port),
            1 => Some(Self::Hypercall),
            _ => None,
        }
    }

    pub const fn index(self) -> usize {
        self as usize
    }
}

/// Why a request or a reply is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Error {
    UnknownOp = 1,
    BadSession = 2,
    /// More than [`DATA_MAX`] bytes, or bytes where the operation has none.
    BadCount = 3,
    /// Word 0 has bits set that the layout leaves zero.
    ReservedBits = 4,
    /// A data word has bytes beyond the count.
    Padding = 5,
    /// The server is inside another request (cannot happen with one
    /// handler EC; answered rather than waited on).
    Busy = 6,
    /// A reply with a status no [`Error`] has.
    UnknownStatus = 7,
}

impl Error {
    pub const fn code(self) -> u8 {
        self as u8
    }

    pub const fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Self::UnknownOp),
            2 => Some(Self::BadSession),
            3 => Some(Self::BadCount),
            4 => Some(Self::ReservedBits),
            5 => Some(Self::Padding),
            6 => Some(Self::Busy),
            7 => Some(Self::UnknownStatus),
            _ => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::UnknownOp => "unknown operation",
            Self::BadSession => "no such session",
            Self::BadCount => "bad byte count",
            Self::ReservedBits => "reserved bits set",
            Self::Padding => "bytes beyond the count",
            Self::Busy => "busy",
            Self::UnknownStatus => "unknown status",
        })
    }
}

/// Up to [`DATA_MAX`] bytes, as words 1–5 carry them.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    len: u8,
    bytes: [u8; DATA_MAX],
}

impl fmt::Debug for Chunk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Chunk(\"{}\")", self.as_bytes().escape_ascii())
    }
}

impl Chunk {
    pub const EMPTY: Self = Self {
        len: 0,
        bytes: [0; DATA_MAX],
    };

    /// `None` for more than [`DATA_MAX`] bytes.
    pub fn new(bytes: &[u8]) -> Option<Self> {
        (bytes.len() <= DATA_MAX).then(|| Self::prefix(bytes))
    }

    /// The first [`DATA_MAX`] bytes of `bytes` (all, if fewer).
    pub fn prefix(bytes: &[u8]) -> Self {
        let len = bytes.len().min(DATA_MAX);
        let mut chunk = Self::EMPTY;
        chunk.bytes[..len].copy_from_slice(&bytes[..len]);
        chunk.len = len as u8;
        chunk
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len).min(DATA_MAX)]
    }

    pub fn len(&self) -> usize {
        self.as_bytes().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn to_words(self) -> [u64; DATA_WORDS] {
        core::array::from_fn(|i| {
            let mut word = [0u8; 8];
            word.copy_from_slice(&self.bytes[i * 8..i * 8 + 8]);
            u64::from_le_bytes(word)
        })
    }

    /// `count` bytes from `words`; the rest of them must be zero.
    fn from_words(words: &[u64], count: u8) -> Result<Self, Error> {
        let len = usize::from(count);
        if len > DATA_MAX {
            return Err(Error::BadCount);
        }
        let mut chunk = Self::EMPTY;
        for (slot, word) in chunk.bytes.chunks_exact_mut(8).zip(words) {
            slot.copy_from_slice(&word.to_le_bytes());
        }
        if chunk.bytes[len..].iter().any(|&b| b != 0) {
            return Err(Error::Padding);
        }
        chunk.len = count;
        Ok(chunk)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    Write { session: SessionId, data: Chunk },
    Read { session: SessionId },
    Status { session: SessionId },
    ResetSession { session: SessionId },
}

/// Word 0 fields, before validation.
struct Header {
    op: u8,
    session: u8,
    count: u8,
    status: u8,
    pending: u16,
}

impl Header {
    fn decode(word: u64) -> Self {
        let byte = |shift: u32| ((word >> shift) & BYTE) as u8;
        Self {
            op: byte(OP_SHIFT),
            session: byte(SESSION_SHIFT),
            count: byte(COUNT_SHIFT),
            status: byte(STATUS_SHIFT),
            pending: ((word >> PENDING_SHIFT) & PENDING_MASK) as u16,
        }
    }

    fn encode(&self) -> u64 {
        u64::from(self.op) << OP_SHIFT
            | u64::from(self.session) << SESSION_SHIFT
            | u64::from(self.count) << COUNT_SHIFT
            | u64::from(self.status) << STATUS_SHIFT
            | u64::from(self.pending) << PENDING_SHIFT
    }
}

fn message(header: Header, data: [u64; DATA_WORDS]) -> [u64; 6] {
    let [a, b, c, d, e] = data;
    [header.encode(), a, b, c, d, e]
}

impl Request {
    pub fn session(&self) -> SessionId {
        match *self {
            Self::Write { session, .. }
            | Self::Read { session }
            | Self::Status { session }
            | Self::ResetSession { session } => session,
        }
    }

    pub fn op(&self) -> Op {
        match self {
            Self::Write { .. } => Op::Write,
            Self::Read { .. } => Op::Read,
            Self::Status { .. } => Op::Status,
            Self::ResetSession { .. } => Op::ResetSession,
        }
    }

    pub fn encode(&self) -> [u64; 6] {
        let data = match self {
            Self::Write { data, .. } => *data,
            _ => Chunk::EMPTY,
        };
        let header = Header {
            op: self.op() as u8,
            session: self.session() as u8,
            count: data.len,
            status: 0,
            pending: 0,
        };
        message(header, data.to_words())
    }

    pub fn decode(words: [u64; 6]) -> Result<Self, Error> {
        let header = Header::decode(words[0]);
        let op = Op::from_u8(header.op).ok_or(Error::UnknownOp)?;
        if words[0] & REQUEST_RESERVED != 0 {
            return Err(Error::ReservedBits);
        }
        let session = SessionId::from_u8(header.session).ok_or(Error::BadSession)?;
        if op != Op::Write && header.count != 0 {
            return Err(Error::BadCount);
        }
        let data = Chunk::from_words(&words[1..], header.count)?;
        Ok(match op {
            Op::Write => Self::Write { session, data },
            Op::Read => Self::Read { session },
            Op::Status => Self::Status { session },
            Op::ResetSession => Self::ResetSession { session },
        })
    }
}

/// What `STATUS` reports, in words 1–5.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Frames released since the modem started (missed ones included).
    pub frames: u64,
    pub missed: u64,
    pub worst_jitter_ns: u64,
    /// SMS sent over all sessions.
    pub sms_sent: u64,
    /// Differs between instances, so a client sees the modem restarted.
    pub instance: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    Written {
        session: SessionId,
        accepted: u8,
        pending: u16,
    },
    Data {
        session: SessionId,
        data: Chunk,
        pending: u16,
    },
    Status {
        session: SessionId,
        pending: u16,
        stats: Stats,
    },
    Reset {
        session: SessionId,
    },
    Refused(Error),
}

impl Reply {
    pub fn encode(&self) -> [u64; 6] {
        let header = |op: Op, session: SessionId, count: u8, pending: u16| Header {
            op: op as u8,
            session: session as u8,
            count,
            status: 0,
            pending,
        };
        match *self {
            Self::Written {
                session,
                accepted,
                pending,
            } => message(header(Op::Write, session, accepted, pending), [0; 5]),
            Self::Data {
                session,
                data,
                pending,
            } => message(
                header(Op::Read, session, data.len, pending),
                data.to_words(),
            ),
            Self::Status {
                session,
                pending,
                stats,
            } => message(
                header(Op::Status, session, 0, pending),
                [
                    stats.frames,
                    stats.missed,
                    stats.worst_jitter_ns,
                    stats.sms_sent,
                    stats.instance,
                ],
            ),
            Self::Reset { session } => message(header(Op::ResetSession, session, 0, 0), [0; 5]),
            Self::Refused(error) => {
                let refused = Header {
                    op: 0,
                    session: 0,
                    count: 0,
                    status: error.code(),
                    pending: 0,
                };
                message(refused, [0; 5])
            }
        }
    }

    pub fn decode(words: [u64; 6]) -> Result<Self, Error> {
        if words[0] & REPLY_RESERVED != 0 {
            return Err(Error::ReservedBits);
        }
        let header = Header::decode(words[0]);
        if header.status != 0 {
            let error = Error::from_code(header.status).ok_or(Error::UnknownStatus)?;
            let rest_zero = words[0] & !(BYTE << STATUS_SHIFT) == 0;
            if !rest_zero || words[1..].iter().any(|&w| w != 0) {
                return Err(Error::Padding);
            }
            return Ok(Self::Refused(error));
        }
        let op = Op::from_u8(header.op).ok_or(Error::UnknownOp)?;
        let session = SessionId::from_u8(header.session).ok_or(Error::BadSession)?;
        let pending = header.pending;
        if !matches!(op, Op::Write | Op::Read) && header.count != 0 {
            return Err(Error::BadCount);
        }
        match op {
            Op::Write => {
                Chunk::from_words(&words[1..], 0)?;
                if usize::from(header.count) > DATA_MAX {
                    return Err(Error::BadCount);
                }
                Ok(Self::Written {
                    session,
                    accepted: header.count,
                    pending,
                })
            }
            Op::Read => Ok(Self::Data {
                session,
                data: Chunk::from_words(&words[1..], header.count)?,
                pending,
            }),
            Op::Status => Ok(Self::Status {
                session,
                pending,
                stats: Stats {
                    frames: words[1],
                    missed: words[2],
                    worst_jitter_ns: words[3],
                    sms_sent: words[4],
                    instance: words[5],
                },
            }),
            Op::ResetSession => {
                Chunk::from_words(&words[1..], 0)?;
                if pending != 0 {
                    return Err(Error::ReservedBits);
                }
                Ok(Self::Reset { session })
            }
        }
    }
}

/// What the frame tick shares with the portal handler.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Telemetry {
    pub frames: u64,
    pub missed: u64,
    pub worst_jitter_ns: u64,
    pub instance: u64,
}

/// The modem's server side: one AT session per [`SessionId`].
pub struct Modem {
    sessions: [Session; SESSIONS],
}

impl Default for Modem {
    fn default() -> Self {
        Self::new()
    }
}

impl Modem {
    pub const fn new() -> Self {
        Self {
            sessions: [Session::new(), Session::new()],
        }
    }

    pub fn session(&self, id: SessionId) -> &Session {
        &self.sessions[id.index()]
    }

    /// One call's words in, the reply's words out; never panics.
    pub fn handle(
        &mut self,
        words: [u64; 6],
        telemetry: Telemetry,
        events: &mut impl Events,
    ) -> [u64; 6] {
        let reply = match Request::decode(words) {
            Ok(request) => self.serve(request, telemetry, events),
            Err(error) => Reply::Refused(error),
        };
        reply.encode()
    }

    pub fn serve(
        &mut self,
        request: Request,
        telemetry: Telemetry,
        events: &mut impl Events,
    ) -> Reply {
        let sms_sent = self
            .sessions
            .iter()
            .fold(0u64, |sum, s| sum.wrapping_add(s.sms_sent()));
        let id = request.session();
        let session = &mut self.sessions[id.index()];
        let pending = |session: &Session| u16::try_from(session.pending()).unwrap_or(u16::MAX);
        match request {
            Request::Write { data, .. } => {
                let signal = Signal::at_frame(telemetry.frames);
                let accepted = session.write(data.as_bytes(), signal, events);
                Reply::Written {
                    session: id,
                    accepted: accepted.min(DATA_MAX) as u8,
                    pending: pending(session),
                }
            }
            Request::Read { .. } => {
                let mut buf = [0u8; DATA_MAX];
                let n = session.read(&mut buf);
                Reply::Data {
                    session: id,
                    data: Chunk::prefix(&buf[..n]),
                    pending: pending(session),
                }
            }
            Request::Status { .. } => Reply::Status {
                session: id,
                pending: pending(session),
                stats: Stats {
                    frames: telemetry.frames,
                    missed: telemetry.missed,
                    worst_jitter_ns: telemetry.worst_jitter_ns,
                    sms_sent,
                    instance: telemetry.instance,
                },
            },
            Request::ResetSession { .. } => {
                session.reset();
                Reply::Reset { session: id }
            }
        }
    }
}

/// Why an [`exchange`] failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExchangeError<E> {
    /// The call itself failed.
    Call(E),
    /// The modem refused a request.
    Refused(Error),
    /// The reply did not decode.
    Malformed(Error),
    /// A reply of another operation or session, or one that cannot be.
    Unexpected,
    /// The modem takes no bytes and has nothing to read.
    Stalled,
    /// The answer does not fit the buffer.
    AnswerTooLong,
}

/// One request through `call` (an IPC call or a hypercall).
pub fn request<E>(
    call: &mut impl FnMut([u64; 6]) -> Result<[u64; 6], E>,
    request: Request,
) -> Result<Reply, ExchangeError<E>> {
    let words = call(request.encode()).map_err(ExchangeError::Call)?;
    match Reply::decode(words).map_err(ExchangeError::Malformed)? {
        Reply::Refused(error) => Err(ExchangeError::Refused(error)),
        reply => Ok(reply),
    }
}

/// Writes all of `input` to `session` and reads the whole answer into
/// `answer`, reading whenever the modem takes no more; returns the
/// answer's length.
pub fn exchange<E>(
    call: &mut impl FnMut([u64; 6]) -> Result<[u64; 6], E>,
    session: SessionId,
    input: &[u8],
    answer: &mut [u8],
) -> Result<usize, ExchangeError<E>> {
    let mut sent = 0;
    let mut got = 0;
    loop {
        let data = Chunk::prefix(input.get(sent..).unwrap_or(&[]));
        let mut accepted = 0;
        if !data.is_empty() {
            match request(call, Request::Write { session, data })? {
                Reply::Written {
                    session: s,
                    accepted: n,
                    ..
                } if s == session && usize::from(n) <= data.len() => accepted = usize::from(n),
                _ => return Err(ExchangeError::Unexpected),
            }
        }
        sent += accepted;
        let read = drain(call, session, answer.get_mut(got..).unwrap_or(&mut []))?;
        got += read;
        if sent >= input.len() {
            return Ok(got);
        }
        if accepted == 0 && read == 0 {
            return Err(ExchangeError::Stalled);
        }
    }
}

/// Reads until nothing is pending.
fn drain<E>(
    call: &mut impl FnMut([u64; 6]) -> Result<[u64; 6], E>,
    session: SessionId,
    buf: &mut [u8],
) -> Result<usize, ExchangeError<E>> {
    let mut got = 0;
    loop {
        let (data, pending) = match request(call, Request::Read { session })? {
            Reply::Data {
                session: s,
                data,
                pending,
            } if s == session => (data, pending),
            _ => return Err(ExchangeError::Unexpected),
        };
        let slot = buf
            .get_mut(got..got + data.len())
            .ok_or(ExchangeError::AnswerTooLong)?;
        slot.copy_from_slice(data.as_bytes());
        got += data.len();
        if pending == 0 {
            return Ok(got);
        }
        if data.is_empty() {
            return Err(ExchangeError::Unexpected);
        }
    }
}

/// The periodic frame tick's clock: frame `n` is released at
/// `start + n * period`; a wake-up after the next release misses the
/// frames in between, and the clock resynchronises past them.
#[derive(Clone, Debug)]
pub struct FrameClock {
    start: u64,
    period: u64,
    /// The frame to be released next (from 1).
    next: u64,
    missed: u64,
    worst_late: u64,
}

/// One wake-up, as [`FrameClock::woke`] judged it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Wake {
    /// Ticks after the release.
    pub late: u64,
    /// Frames whose release passed before this wake-up.
    pub missed: u64,
}

impl FrameClock {
    /// A clock of `period` ticks (at least 1) from `start`.
    pub fn new(start: u64, period: u64) -> Self {
        Self {
            start,
            period: period.max(1),
            next: 1,
            missed: 0,
            worst_late: 0,
        }
    }

    /// The release time of the next frame: sleep until then.
    pub fn release(&self) -> u64 {
        self.start
            .saturating_add(self.next.saturating_mul(self.period))
    }

    /// The tick woke at `now` for the frame due at [`Self::release`].
    pub fn woke(&mut self, now: u64) -> Wake {
        let late = now.saturating_sub(self.release());
        let missed = late / self.period;
        self.missed = self.missed.saturating_add(missed);
        self.worst_late = self.worst_late.max(late);
        self.next = self.next.saturating_add(missed).saturating_add(1);
        Wake { late, missed }
    }

    /// Frames released so far, missed ones included.
    pub fn frames(&self) -> u64 {
        self.next - 1
    }

    pub fn missed(&self) -> u64 {
        self.missed
    }

    /// The latest wake-up after a release so far, in ticks.
    pub fn worst_late(&self) -> u64 {
        self.worst_late
    }
}

/// `ticks` of a `hz` clock in nanoseconds (saturating; 0 for `hz` 0).
pub fn ticks_to_ns(ticks: u64, hz: u64) -> u64 {
    const NS_PER_S: u128 = 1_000_000_000;
    match u128::from(ticks)
        .saturating_mul(NS_PER_S)
        .checked_div(u128::from(hz))
    {
        Some(ns) => u64::try_from(ns).unwrap_or(u64::MAX),
        None => 0,
    }
}

/// Whether a summary is due after the frame count went from `before` to
/// `after`: it passed a multiple of `every` (never for `every` 0).
pub fn report_due(before: u64, after: u64, every: u64) -> bool {
    every != 0 && before / every != after / every
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::modem_at::OUTPUT_CAP;
    use crate::rng::Xorshift;

    #[derive(Default)]
    struct Log(Vec<(Vec<u8>, Vec<u8>, u8)>);

    impl Events for Log {
        fn sms_sent(&mut self, number: &[u8], text: &[u8], reference: u8) {
            self.0.push((number.to_vec(), text.to_vec(), reference));
        }
    }

    const TELEMETRY: Telemetry = Telemetry {
        frames: 4321,
        missed: 2,
        worst_jitter_ns: 56_000,
        instance: 0xfeed,
    };

    fn chunk(bytes: &[u8]) -> Chunk {
        Chunk::new(bytes).unwrap()
    }

    #[test]
    fn request_layout() {
        let write = Request::Write {
            session: SessionId::Hypercall,
            data: chunk(b"AT+CSQ\r"),
        };
        let words = write.encode();
        assert_eq!(words[0], 1 | 1 << 8 | 7 << 16);
        assert_eq!(words[1], u64::from_le_bytes(*b"AT+CSQ\r\0"));
        assert_eq!(&words[2..], &[0; 4]);
        assert_eq!(Request::decode(words), Ok(write));
        let full = chunk(&[0xa5; DATA_MAX]);
        let write = Request::Write {
            session: SessionId::Port,
            data: full,
        };
        assert_eq!(write.encode()[5], 0xa5a5_a5a5_a5a5_a5a5);
        assert_eq!(Request::decode(write.encode()), Ok(write));
        for session in [SessionId::Port, SessionId::Hypercall] {
            for request in [
                Request::Read { session },
                Request::Status { session },
                Request::ResetSession { session },
            ] {
                assert_eq!(Request::decode(request.encode()), Ok(request));
                assert_eq!(&request.encode()[1..], &[0; 5]);
            }
        }
        assert_eq!(
            Request::Read {
                session: SessionId::Hypercall
            }
            .encode()[0],
            0x102
        );
        assert!(Chunk::new(&[0; DATA_MAX + 1]).is_none());
        assert_eq!(Chunk::prefix(&[7; 50]).len(), DATA_MAX);
    }

    #[test]
    fn malformed_requests_are_typed_errors() {
        let ok = Request::Write {
            session: SessionId::Port,
            data: chunk(b"AT"),
        }
        .encode();
        let with = |word0: u64, rest: [u64; 5]| {
            let [a, b, c, d, e] = rest;
            Request::decode([word0, a, b, c, d, e])
        };
        assert_eq!(with(0, [0; 5]), Err(Error::UnknownOp));
        assert_eq!(with(5, [0; 5]), Err(Error::UnknownOp));
        assert_eq!(with(0xff, [0; 5]), Err(Error::UnknownOp));
        assert_eq!(
            with(ok[0] | 1 << 24, [ok[1], 0, 0, 0, 0]),
            Err(Error::ReservedBits)
        );
        assert_eq!(
            with(ok[0] | 1 << 63, [ok[1], 0, 0, 0, 0]),
            Err(Error::ReservedBits)
        );
        assert_eq!(with(1 | 2 << 8, [0; 5]), Err(Error::BadSession));
        assert_eq!(with(1 | 0xff << 8, [0; 5]), Err(Error::BadSession));
        assert_eq!(with(1 | 41 << 16, [0; 5]), Err(Error::BadCount));
        assert_eq!(with(1 | 255 << 16, [0; 5]), Err(Error::BadCount));
        assert_eq!(
            with(2 | 1 << 16, [b'x'.into(), 0, 0, 0, 0]),
            Err(Error::BadCount)
        );
        // "AT" and a stray byte after the count.
        assert_eq!(
            with(ok[0], [ok[1] | 1 << 16, 0, 0, 0, 0]),
            Err(Error::Padding)
        );
        assert_eq!(with(ok[0], [ok[1], 0, 0, 0, 1 << 56]), Err(Error::Padding));
        assert_eq!(with(3, [0, 0, 1, 0, 0]), Err(Error::Padding));
        assert_eq!(with(4, [u64::MAX; 5]), Err(Error::Padding));
    }

    #[test]
    fn reply_layout_and_round_trips() {
        let stats = Stats {
            frames: 1,
            missed: 2,
            worst_jitter_ns: 3,
            sms_sent: 4,
            instance: u64::MAX,
        };
        let replies = [
            Reply::Written {
                session: SessionId::Hypercall,
                accepted: 40,
                pending: 512,
            },
            Reply::Data {
                session: SessionId::Port,
                data: chunk(b"OK\r\n"),
                pending: 0xffff,
            },
            Reply::Status {
                session: SessionId::Port,
                pending: 9,
                stats,
            },
            Reply::Reset {
                session: SessionId::Hypercall,
            },
            Reply::Refused(Error::Busy),
        ];
        for reply in replies {
            assert_eq!(Reply::decode(reply.encode()), Ok(reply), "{reply:?}");
        }
        assert_eq!(replies[0].encode()[0], 1 | 1 << 8 | 40 << 16 | 512 << 32);
        assert_eq!(replies[2].encode()[1..], [1, 2, 3, 4, u64::MAX]);
        assert_eq!(replies[4].encode(), [6 << 24, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn malformed_replies_are_typed_errors() {
        let word = |op: u64, count: u64, status: u64| op | count << 16 | status << 24;
        let decode = |w0, w1| Reply::decode([w0, w1, 0, 0, 0, 0]);
        assert_eq!(decode(word(0, 0, 0), 0), Err(Error::UnknownOp));
        assert_eq!(decode(word(2, 0, 0) | 1 << 48, 0), Err(Error::ReservedBits));
        assert_eq!(decode(word(0, 0, 99), 0), Err(Error::UnknownStatus));
        assert_eq!(decode(word(1, 0, 1), 0), Err(Error::Padding));
        assert_eq!(decode(word(0, 0, 1), 5), Err(Error::Padding));
        assert_eq!(decode(word(1, 41, 0), 0), Err(Error::BadCount));
        assert_eq!(decode(word(1, 3, 0), 1), Err(Error::Padding));
        assert_eq!(decode(word(2, 41, 0), 0), Err(Error::BadCount));
        assert_eq!(decode(word(2, 1, 0), 0x100), Err(Error::Padding));
        assert_eq!(decode(word(3, 1, 0), 0), Err(Error::BadCount));
        assert_eq!(decode(word(4, 0, 0) | 1 << 32, 0), Err(Error::ReservedBits));
        assert_eq!(decode(word(4, 0, 0) | 7 << 8, 0), Err(Error::BadSession));
    }

    /// The modem over `Modem::handle`, as a portal caller sees it.
    fn caller<'a>(
        modem: &'a mut Modem,
        log: &'a mut Log,
        telemetry: Telemetry,
    ) -> impl FnMut([u64; 6]) -> Result<[u64; 6], ()> + 'a {
        move |words| Ok(modem.handle(words, telemetry, log))
    }

    fn talk(modem: &mut Modem, log: &mut Log, session: SessionId, input: &[u8]) -> String {
        let mut answer = [0u8; 2048];
        let mut call = caller(modem, log, TELEMETRY);
        let n = exchange(&mut call, session, input, &mut answer).unwrap();
        String::from_utf8_lossy(&answer[..n]).into_owned()
    }

    #[test]
    fn a_whole_conversation_through_the_words() {
        let mut modem = Modem::new();
        let mut log = Log::default();
        let port = SessionId::Port;
        assert_eq!(talk(&mut modem, &mut log, port, b"AT\r\n"), "OK\r\n");
        // Frame 4321: step 4 of the simulated radio.
        assert_eq!(
            talk(&mut modem, &mut log, port, b"AT+CSQ\r"),
            "+CSQ: 14,0\r\nOK\r\n"
        );
        let text = b"A message longer than one chunk of forty bytes";
        let sms = [&b"AT+CMGS=\"+4915550100\"\r"[..], text, b"\x1a"].concat();
        assert_eq!(
            talk(&mut modem, &mut log, port, &sms),
            "> +CMGS: 1\r\nOK\r\n"
        );
        assert_eq!(log.0.len(), 1);
        assert_eq!(log.0[0].1, text);
        talk(
            &mut modem,
            &mut log,
            port,
            b"AT+CGDCONT=1,\"IP\",\"internet\"\r",
        );
        assert_eq!(
            talk(&mut modem, &mut log, port, b"ATD*99#\r"),
            "CONNECT\r\n"
        );
        // A packet bigger than the session's output: the exchange reads
        // in between and gets all of it back.
        let packet: Vec<u8> = (0..3 * OUTPUT_CAP).map(|i| (i * 7) as u8).collect();
        let mut answer = vec![0u8; packet.len()];
        let mut call = caller(&mut modem, &mut log, TELEMETRY);
        let n = exchange(&mut call, port, &packet, &mut answer).unwrap();
        assert_eq!(&answer[..n], &packet[..]);
        drop(call);
        assert_eq!(talk(&mut modem, &mut log, port, b"+++"), "OK\r\n");
        assert_eq!(talk(&mut modem, &mut log, port, b"ATH\r"), "OK\r\n");

        let mut call = caller(&mut modem, &mut log, TELEMETRY);
        let status = request(&mut call, Request::Status { session: port }).unwrap();
        let want = Stats {
            frames: 4321,
            missed: 2,
            worst_jitter_ns: 56_000,
            sms_sent: 1,
            instance: 0xfeed,
        };
        assert_eq!(
            status,
            Reply::Status {
                session: port,
                pending: 0,
                stats: want
            }
        );
    }

    #[test]
    fn sessions_do_not_mix_and_reset_alone() {
        let mut modem = Modem::new();
        let mut log = Log::default();
        let (port, hypercall) = (SessionId::Port, SessionId::Hypercall);
        assert_eq!(talk(&mut modem, &mut log, hypercall, b"AT+C"), "");
        assert_eq!(talk(&mut modem, &mut log, port, b"ATX\r"), "ERROR\r\n");
        assert_eq!(
            talk(&mut modem, &mut log, hypercall, b"SQ\r"),
            "+CSQ: 14,0\r\nOK\r\n"
        );
        // Pending output survives in one session while the other resets.
        let mut call = caller(&mut modem, &mut log, TELEMETRY);
        let written = request(
            &mut call,
            Request::Write {
                session: port,
                data: chunk(b"AT\r"),
            },
        );
        assert!(matches!(
            written,
            Ok(Reply::Written {
                accepted: 3,
                pending: 4,
                ..
            })
        ));
        request(
            &mut call,
            Request::Write {
                session: hypercall,
                data: chunk(b"AT\r"),
            },
        )
        .unwrap();
        let reset = request(&mut call, Request::ResetSession { session: hypercall });
        assert_eq!(reset, Ok(Reply::Reset { session: hypercall }));
        drop(call);
        assert_eq!(modem.session(hypercall).pending(), 0);
        assert_eq!(modem.session(port).pending(), 4);
    }

    #[test]
    fn exchange_reports_refusals_and_bad_servers() {
        let mut modem = Modem::new();
        let mut log = Log::default();
        let mut call = caller(&mut modem, &mut log, TELEMETRY);
        let refused = call([0x77, 0, 0, 0, 0, 0]).unwrap();
        assert_eq!(Reply::decode(refused), Ok(Reply::Refused(Error::UnknownOp)));

        let mut answer = [0u8; 3];
        let too_long = exchange(&mut call, SessionId::Port, b"AT+CSQ\r", &mut answer);
        assert_eq!(too_long, Err(ExchangeError::AnswerTooLong));

        let mut failing = |_| Err("gone");
        let failed = exchange(&mut failing, SessionId::Port, b"AT\r", &mut answer);
        assert_eq!(failed, Err(ExchangeError::Call("gone")));
        // A server that takes nothing and has nothing to read.
        let stuck = |_| {
            Ok::<_, ()>(
                Reply::Written {
                    session: SessionId::Port,
                    accepted: 0,
                    pending: 0,
                }
                .encode(),
            )
        };
        let mut stuck_reads = |words: [u64; 6]| {
            Ok::<_, ()>(match Request::decode(words) {
                Ok(Request::Read { session }) => Reply::Data {
                    session,
                    data: Chunk::EMPTY,
                    pending: 0,
                }
                .encode(),
                _ => stuck(words).unwrap(),
            })
        };
        let stalled = exchange(&mut stuck_reads, SessionId::Port, b"AT\r", &mut answer);
        assert_eq!(stalled, Err(ExchangeError::Stalled));
        // A server claiming more pending bytes but sending none.
        let mut liar = |words: [u64; 6]| {
            Ok::<_, ()>(match Request::decode(words) {
                Ok(Request::Read { session }) => Reply::Data {
                    session,
                    data: Chunk::EMPTY,
                    pending: 5,
                }
                .encode(),
                _ => Reply::Written {
                    session: SessionId::Port,
                    accepted: 3,
                    pending: 5,
                }
                .encode(),
            })
        };
        let lied = exchange(&mut liar, SessionId::Port, b"AT\r", &mut answer);
        assert_eq!(lied, Err(ExchangeError::Unexpected));
        // A reply for the other session.
        let mut crossed = |_| {
            Ok::<_, ()>(
                Reply::Written {
                    session: SessionId::Hypercall,
                    accepted: 1,
                    pending: 0,
                }
                .encode(),
            )
        };
        assert_eq!(
            exchange(&mut crossed, SessionId::Port, b"AT\r", &mut answer),
            Err(ExchangeError::Unexpected)
        );
    }

    /// Random words, and random mutations of valid requests: every call
    /// is answered with a reply that decodes, never a panic.
    #[test]
    fn fuzz_random_words() {
        let mut rng = Xorshift::new(0x006d_6f64_656d);
        let mut modem = Modem::new();
        let mut log = Log::default();
        let mut refused = 0;
        for i in 0..50_000u64 {
            let mut words = if rng.one_in(2) {
                core::array::from_fn(|_| rng.next_u64())
            } else {
                let session = if rng.one_in(2) {
                    SessionId::Port
                } else {
                    SessionId::Hypercall
                };
                let len = rng.below(DATA_MAX as u64 + 1) as usize;
                let bytes: Vec<u8> = (0..len)
                    .map(|_| b"AT+CSQ\r\n\x1a+D*99#"[rng.below(15) as usize])
                    .collect();
                match rng.below(4) {
                    0 => Request::Read { session },
                    1 => Request::Status { session },
                    2 => Request::ResetSession { session },
                    _ => Request::Write {
                        session,
                        data: chunk(&bytes),
                    },
                }
                .encode()
            };
            if rng.one_in(8) {
                let bit = rng.below(64 * 6);
                words[(bit / 64) as usize] ^= 1 << (bit % 64);
            }
            let telemetry = Telemetry {
                frames: i,
                ..TELEMETRY
            };
            let reply = Reply::decode(modem.handle(words, telemetry, &mut log));
            match reply {
                Ok(Reply::Refused(error)) => {
                    assert_eq!(Request::decode(words), Err(error));
                    refused += 1;
                }
                Ok(reply) => assert!(Request::decode(words).is_ok(), "{reply:?}"),
                Err(error) => panic!("the modem's own reply did not decode: {error}"),
            }
            for id in [SessionId::Port, SessionId::Hypercall] {
                assert!(modem.session(id).pending() <= OUTPUT_CAP);
            }
        }
        assert!(refused > 10_000 && refused < 40_000, "{refused}");
    }

    #[test]
    fn frame_clock_counts_jitter_and_missed_frames() {
        let mut clock = FrameClock::new(1000, 100);
        assert_eq!((clock.release(), clock.frames()), (1100, 0));
        assert_eq!(clock.woke(1100), Wake { late: 0, missed: 0 });
        assert_eq!(clock.release(), 1200);
        assert_eq!(
            clock.woke(1230),
            Wake {
                late: 30,
                missed: 0
            }
        );
        assert_eq!(clock.frames(), 2);
        // Woke after frames 4 and 5 were due: both missed, resync to 6.
        assert_eq!(clock.release(), 1300);
        assert_eq!(
            clock.woke(1520),
            Wake {
                late: 220,
                missed: 2
            }
        );
        assert_eq!((clock.frames(), clock.missed()), (5, 2));
        assert_eq!(clock.release(), 1600);
        // Early wake-ups (a spurious return) are not negative jitter.
        assert_eq!(clock.woke(1590), Wake { late: 0, missed: 0 });
        assert_eq!(clock.worst_late(), 220);
        // Degenerate clocks stay defined.
        let mut zero = FrameClock::new(u64::MAX - 5, 0);
        assert_eq!(zero.release(), u64::MAX - 4);
        assert_eq!(zero.woke(u64::MAX), Wake { late: 4, missed: 4 });
        assert_eq!(zero.release(), u64::MAX);
        let mut late = FrameClock::new(0, 1);
        assert_eq!(late.woke(u64::MAX).missed, u64::MAX - 1);
        late.woke(u64::MAX);
    }

    #[test]
    fn conversions_and_reports() {
        assert_eq!(ticks_to_ns(2_600, 2_600_000_000), 1_000);
        assert_eq!(ticks_to_ns(1, 1_000_000_000), 1);
        assert_eq!(ticks_to_ns(5, 0), 0);
        assert_eq!(ticks_to_ns(u64::MAX, 1), u64::MAX);
        assert!(report_due(999, 1000, 1000));
        assert!(report_due(998, 1003, 1000));
        assert!(!report_due(1000, 1999, 1000));
        assert!(!report_due(0, 5000, 0));
    }
}
