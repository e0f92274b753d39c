//! `iobench`: disk and TCP throughput and latency from inside the guest
//! (`cargo xtask bench io`). The command line, the seeded random offsets,
//! the TCP exchange's bytes and the result lines; the system calls are in
//! `src/bin/iobench.rs`.
//!
//! Result lines, one per figure, times in nanoseconds of the guest's
//! monotonic clock:
//! ```text
//! iobench: seq-write round=R bytes=B block=K ns=T
//! iobench: seq-read round=R bytes=B block=K ns=T
//! iobench: rand-read count=N bytes=4096 median_ns=X min_ns=Y
//! iobench: tcp-listen port=P rounds=R bytes=B
//! iobench: tcp-send round=R bytes=B ns=T
//! iobench: tcp-recv round=R bytes=B ns=T
//! iobench: FAIL <why>
//! ```

use common::rng::Xorshift;

use crate::args::{Parsed, UsageError, Word, Words};
use crate::stats::Summary;

pub const MIB: u64 = 1 << 20;
/// The size of one random read, and the alignment O_DIRECT wants.
pub const PAGE: u64 = 4096;
pub const DEFAULT_DEVICE: &str = "/dev/vda";
pub const DEFAULT_MIB: u64 = 64;
pub const DEFAULT_BLOCK_KIB: u64 = 1024;
pub const DEFAULT_ROUNDS: u32 = 3;
pub const DEFAULT_RANDOM: usize = 1000;
pub const DEFAULT_SEED: u64 = 1;
pub const DEFAULT_TCP_MIB: u64 = 8;
/// What the host sends when it has read a round's bytes, and the guest
/// when it has read the host's.
pub const ACK: u8 = b'A';
/// What the guest sends to ask the host for a round's bytes.
pub const GO: u8 = b'G';

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskOptions {
    pub device: String,
    /// Bytes written and read sequentially each round, from offset 0.
    pub bytes: u64,
    pub block: u64,
    pub rounds: u32,
    /// Random 4 KiB reads, each at a seeded page of the first `bytes`.
    pub random: usize,
    pub seed: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpOptions {
    pub port: u16,
    /// Bytes each way each round.
    pub bytes: u64,
    pub rounds: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    Disk(DiskOptions),
    Tcp(TcpOptions),
}

impl Mode {
    /// `disk [--dev PATH] [--mib N] [--block-kib N] [--rounds N] [--random N]
    /// [--seed N]` or `tcp --port P [--mib N] [--rounds N]`.
    pub fn parse(args: &[String]) -> Result<Parsed<Mode>, UsageError> {
        let mut words = Words::new(args);
        let mode = match words.next_word() {
            Some(Word::Help) => return Ok(Parsed::Help),
            Some(Word::Positional("disk")) => "disk",
            Some(Word::Positional("tcp")) => "tcp",
            _ => return Err(UsageError("the first word must be `disk` or `tcp`".into())),
        };
        let mut disk = DiskOptions {
            device: DEFAULT_DEVICE.to_string(),
            bytes: DEFAULT_MIB * MIB,
            block: DEFAULT_BLOCK_KIB * 1024,
            rounds: DEFAULT_ROUNDS,
            random: DEFAULT_RANDOM,
            seed: DEFAULT_SEED,
        };
        let mut tcp = TcpOptions {
            port: 0,
            bytes: DEFAULT_TCP_MIB * MIB,
            rounds: DEFAULT_ROUNDS,
        };
        while let Some(word) = words.next_word() {
            match (mode, word) {
                (_, Word::Help) => return Ok(Parsed::Help),
                ("disk", Word::Flag("dev", v)) => disk.device = words.value("dev", v)?.into(),
                ("disk", Word::Flag("mib", v)) => {
                    disk.bytes = words.number("mib", v, 1..=1 << 20)? * MIB
                }
                ("disk", Word::Flag("block-kib", v)) => {
                    let kib: u64 = words.number("block-kib", v, 4..=64 * 1024)?;
                    if !kib.is_multiple_of(4) {
                        return Err(UsageError("--block-kib must be a multiple of 4".into()));
                    }
                    disk.block = kib * 1024;
                }
                ("disk", Word::Flag("rounds", v)) => {
                    disk.rounds = words.number("rounds", v, 1..=1000)?
                }
                ("disk", Word::Flag("random", v)) => {
                    disk.random = words.number("random", v, 0..=10_000_000)?
                }
                ("disk", Word::Flag("seed", v)) => {
                    disk.seed = words.number("seed", v, 0..=u64::MAX)?
                }
                ("tcp", Word::Flag("port", v)) => tcp.port = words.number("port", v, 1..=65535)?,
                ("tcp", Word::Flag("mib", v)) => {
                    tcp.bytes = words.number("mib", v, 1..=1 << 20)? * MIB
                }
                ("tcp", Word::Flag("rounds", v)) => {
                    tcp.rounds = words.number("rounds", v, 1..=1000)?
                }
                (_, Word::Flag(name, _)) => return Err(UsageError::unknown_flag(name)),
                (_, Word::Positional(p)) => return Err(UsageError(format!("unexpected `{p}`"))),
            }
        }
        Ok(Parsed::Run(match mode {
            "disk" => {
                if !disk.bytes.is_multiple_of(disk.block) {
                    return Err(UsageError("--mib must be a whole number of blocks".into()));
                }
                Mode::Disk(disk)
            }
            _ if tcp.port == 0 => return Err(UsageError("tcp needs --port".into())),
            _ => Mode::Tcp(tcp),
        }))
    }
}

/// The byte offsets of `count` random page reads within the first `bytes`
/// of the disk: the same for the same seed, on every machine.
pub fn random_offsets(seed: u64, count: usize, bytes: u64) -> Vec<u64> {
    let pages = (bytes / PAGE).max(1);
    let mut rng = Xorshift::new(seed);
    (0..count).map(|_| rng.below(pages) * PAGE).collect()
}

/// Stamps every page of `block`, written at byte `offset` of the disk in
/// round `round`, with a word naming both, so that a read which returned
/// the wrong page or an older round's data is seen (a word per page keeps
/// the cost out of the timed loop).
pub fn stamp_block(block: &mut [u8], round: u32, offset: u64) {
    for (i, page) in block.chunks_exact_mut(PAGE as usize).enumerate() {
        page[..8].copy_from_slice(&stamp(round, offset + i as u64 * PAGE));
    }
}

/// Whether every page of `block`, read at `offset`, bears round `round`'s
/// stamp.
pub fn stamped(block: &[u8], round: u32, offset: u64) -> bool {
    block
        .chunks_exact(PAGE as usize)
        .enumerate()
        .all(|(i, page)| page[..8] == stamp(round, offset + i as u64 * PAGE))
}

fn stamp(round: u32, offset: u64) -> [u8; 8] {
    (offset ^ (u64::from(round) << 48) ^ 0x4d4f_4154_0000_0000).to_le_bytes()
}

/// The part of `buffer` that starts at a page boundary and is `len` long
/// (O_DIRECT wants aligned memory); `None` if `buffer` is too short.
pub fn aligned(buffer: &mut [u8], len: usize) -> Option<&mut [u8]> {
    let skip = buffer.as_ptr().align_offset(PAGE as usize);
    buffer.get_mut(skip..skip.checked_add(len)?)
}

pub fn seq_line(what: &str, round: u32, bytes: u64, block: u64, ns: u64) -> String {
    format!("iobench: seq-{what} round={round} bytes={bytes} block={block} ns={ns}")
}

pub fn random_line(s: &Summary) -> String {
    format!(
        "iobench: rand-read count={} bytes={PAGE} median_ns={} min_ns={}",
        s.count, s.median, s.min
    )
}

pub fn listen_line(opts: &TcpOptions) -> String {
    format!(
        "iobench: tcp-listen port={} rounds={} bytes={}",
        opts.port, opts.rounds, opts.bytes
    )
}

pub fn tcp_line(what: &str, round: u32, bytes: u64, ns: u64) -> String {
    format!("iobench: tcp-{what} round={round} bytes={bytes} ns={ns}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::line;

    fn parse(words: &[&str]) -> Result<Parsed<Mode>, UsageError> {
        Mode::parse(&line(words))
    }

    #[test]
    fn disk_defaults_and_flags() {
        let Ok(Parsed::Run(Mode::Disk(d))) = parse(&["disk"]) else {
            panic!()
        };
        assert_eq!(
            (d.device.as_str(), d.bytes, d.block, d.rounds, d.random),
            ("/dev/vda", 64 * MIB, MIB, 3, 1000)
        );
        let Ok(Parsed::Run(Mode::Disk(d))) = parse(&[
            "disk",
            "--dev=/dev/vdb",
            "--mib",
            "8",
            "--block-kib",
            "64",
            "--rounds=1",
            "--random",
            "10",
            "--seed",
            "7",
        ]) else {
            panic!()
        };
        assert_eq!(
            d,
            DiskOptions {
                device: "/dev/vdb".into(),
                bytes: 8 * MIB,
                block: 64 * 1024,
                rounds: 1,
                random: 10,
                seed: 7
            }
        );
        assert!(parse(&["disk", "--block-kib", "6"]).is_err());
        assert!(parse(&["disk", "--mib", "1", "--block-kib", "4096"]).is_err());
        assert!(parse(&["disk", "--port", "1"]).is_err());
        assert!(parse(&["disk", "x"]).is_err());
        assert!(parse(&[]).is_err());
        assert_eq!(parse(&["--help"]), Ok(Parsed::Help));
    }

    #[test]
    fn tcp_needs_a_port() {
        assert!(parse(&["tcp"]).is_err());
        assert!(parse(&["tcp", "--port", "0"]).is_err());
        assert_eq!(
            parse(&["tcp", "--port", "8080", "--mib", "2", "--rounds", "5"]),
            Ok(Parsed::Run(Mode::Tcp(TcpOptions {
                port: 8080,
                bytes: 2 * MIB,
                rounds: 5
            })))
        );
        assert!(parse(&["tcp", "--port", "1", "--dev", "x"]).is_err());
    }

    #[test]
    fn offsets_are_seeded_pages_within_the_area() {
        let a = random_offsets(1, 500, 64 * MIB);
        assert_eq!(a, random_offsets(1, 500, 64 * MIB));
        assert_ne!(a, random_offsets(2, 500, 64 * MIB));
        assert!(a.iter().all(|&o| o % PAGE == 0 && o < 64 * MIB));
        let distinct: std::collections::BTreeSet<_> = a.iter().collect();
        assert!(distinct.len() > 450, "spread over the area");
    }

    #[test]
    fn a_block_checks_only_where_it_was_written() {
        let mut block = vec![0u8; 2 * PAGE as usize];
        stamp_block(&mut block, 2, 8192);
        assert!(stamped(&block, 2, 8192));
        assert!(!stamped(&block, 1, 8192), "an older round");
        assert!(!stamped(&block, 2, 4096), "another place");
        assert!(!stamped(&block[PAGE as usize..], 2, 8192), "a page off");
    }

    #[test]
    fn aligned_slices_start_on_a_page() {
        let mut buffer = vec![0u8; 3 * PAGE as usize];
        let slice = aligned(&mut buffer, 2 * PAGE as usize).unwrap();
        assert_eq!(slice.as_ptr() as usize % PAGE as usize, 0);
        assert_eq!(slice.len(), 2 * PAGE as usize);
        assert!(aligned(&mut buffer, 4 * PAGE as usize).is_none());
    }

    #[test]
    fn lines_as_the_host_reads_them() {
        assert_eq!(
            seq_line("read", 1, 64 * MIB, MIB, 123),
            "iobench: seq-read round=1 bytes=67108864 block=1048576 ns=123"
        );
        let s = Summary::of(&mut [5, 1, 9]).unwrap();
        assert_eq!(
            random_line(&s),
            "iobench: rand-read count=3 bytes=4096 median_ns=5 min_ns=1"
        );
        assert_eq!(
            tcp_line("send", 2, 8, 9),
            "iobench: tcp-send round=2 bytes=8 ns=9"
        );
    }
}
