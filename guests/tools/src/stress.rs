//! `stress`: the load's options, and work that checks itself — arithmetic
//! with a known answer for the CPU threads, a pattern written over memory
//! and read back for the memory thread — so a hypervisor that corrupts a
//! guest's registers or memory under load makes the run fail.

use std::fmt;
use std::hint::black_box;

use crate::args::{Parsed, UsageError, Word, Words};

pub const WORDS_PER_MIB: usize = (1 << 20) / size_of::<u64>();
const MAX_CPUS: u32 = 256;
const MAX_MEM_MIB: usize = 1 << 20;
const MAX_SECONDS: u64 = 24 * 3600;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Options {
    /// Threads spinning on arithmetic.
    pub cpus: u32,
    /// Memory written and verified over and over by one more thread (none
    /// if 0).
    pub mem_mib: usize,
    pub seconds: u64,
    /// Seconds between heartbeat lines (none if 0).
    pub heartbeat: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            cpus: 1,
            mem_mib: 16,
            seconds: 10,
            heartbeat: 0,
        }
    }
}

impl Options {
    /// `[--cpu N] [--mem MIB] [--seconds S] [--heartbeat S]`.
    pub fn parse(args: &[String]) -> Result<Parsed<Options>, UsageError> {
        let mut opts = Options::default();
        let mut words = Words::new(args);
        while let Some(word) = words.next_word() {
            match word {
                Word::Help => return Ok(Parsed::Help),
                Word::Flag("cpu", v) => opts.cpus = words.number("cpu", v, 0..=MAX_CPUS)?,
                Word::Flag("mem", v) => opts.mem_mib = words.number("mem", v, 0..=MAX_MEM_MIB)?,
                Word::Flag("seconds", v) => {
                    opts.seconds = words.number("seconds", v, 1..=MAX_SECONDS)?;
                }
                Word::Flag("heartbeat", v) => {
                    opts.heartbeat = words.number("heartbeat", v, 0..=MAX_SECONDS)?;
                }
                Word::Flag(name, _) => return Err(UsageError::unknown_flag(name)),
                Word::Positional(p) => return Err(UsageError(format!("unexpected `{p}`"))),
            }
        }
        if opts.cpus == 0 && opts.mem_mib == 0 {
            return Err(UsageError("nothing to do: --cpu 0 and --mem 0".into()));
        }
        Ok(Parsed::Run(opts))
    }

    /// The memory thread's buffer, in words (the range of `mem_mib` keeps
    /// this far from overflow).
    pub fn mem_words(&self) -> usize {
        self.mem_mib.saturating_mul(WORDS_PER_MIB)
    }
}

/// The line printed every `--heartbeat` seconds: the load's progress so
/// far, so that a reader of the console sees the guest is alive and
/// getting work done (`cargo xtask soak` judges the gaps between them).
pub fn heartbeat_line(elapsed_secs: u64, cpu_rounds: u64, memory_passes: u64) -> String {
    format!(
        "stress: heartbeat {elapsed_secs} s, {cpu_rounds} cpu rounds, {memory_passes} memory passes"
    )
}

/// The word at `index` in pass `pass`: differs between passes, so a page
/// that kept an older pass's content (a lost write) shows too.
pub fn pattern(pass: u64, index: u64) -> u64 {
    // splitmix64's finalizer over both inputs.
    let mut z = index ^ pass.rotate_left(32) ^ 0x9e37_79b9_7f4a_7c15;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Writes the pattern of `pass` over `words`, the part of the buffer that
/// starts at word `first`.
pub fn fill(words: &mut [u64], first: u64, pass: u64) {
    for (index, word) in (first..).zip(words.iter_mut()) {
        *word = pattern(pass, index);
    }
}

/// A word that does not hold what was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Corruption {
    pub index: u64,
    pub found: u64,
    pub wrote: u64,
}

impl fmt::Display for Corruption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "memory corrupted: word {} (byte {:#x} of the buffer) holds {:#018x}, wrote {:#018x}",
            self.index,
            self.index.wrapping_mul(size_of::<u64>() as u64),
            self.found,
            self.wrote
        )
    }
}

/// Checks that `words`, starting at word `first`, hold the pattern of `pass`.
pub fn verify(words: &[u64], first: u64, pass: u64) -> Result<(), Corruption> {
    for (index, &found) in (first..).zip(words) {
        let wrote = pattern(pass, index);
        if found != wrote {
            return Err(Corruption {
                index,
                found,
                wrote,
            });
        }
    }
    Ok(())
}

/// One round of a CPU thread: integer and floating-point sums computed the
/// long way, compared with their closed forms. `black_box` keeps the
/// compiler from finding the closed form itself.
pub fn cpu_round(round: u64) -> Result<(), String> {
    let n = 1000 + round % 1000;
    let mut squares = 0u64;
    let mut halves = 0f64;
    for i in 0..n {
        let i = black_box(i);
        squares = squares.wrapping_add(i * i);
        halves += i as f64 * 0.5;
    }
    // Both exact: the sums stay far below 2^53.
    let want_squares = (n - 1) * n * (2 * n - 1) / 6;
    let want_halves = ((n - 1) * n / 2) as f64 * 0.5;
    if squares != want_squares || halves != want_halves {
        return Err(format!(
            "arithmetic went wrong in round {round}: sum of squares {squares} (want \
             {want_squares}), sum of halves {halves} (want {want_halves})"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::line;

    fn parse(w: &[&str]) -> Result<Parsed<Options>, UsageError> {
        Options::parse(&line(w))
    }

    #[test]
    fn parses_options() {
        assert_eq!(parse(&[]), Ok(Parsed::Run(Options::default())));
        assert_eq!(
            parse(&["--cpu", "2", "--mem=8", "--seconds", "1"]),
            Ok(Parsed::Run(Options {
                cpus: 2,
                mem_mib: 8,
                seconds: 1,
                heartbeat: 0,
            }))
        );
        assert_eq!(
            parse(&["--heartbeat", "5"]),
            Ok(Parsed::Run(Options {
                heartbeat: 5,
                ..Options::default()
            }))
        );
        assert_eq!(
            parse(&["--cpu", "0", "--mem", "1"]).map(|_| ()),
            Ok(()),
            "memory only"
        );
        assert_eq!(parse(&["--help", "--bogus"]), Ok(Parsed::Help));
        for bad in [
            &["--cpu", "0", "--mem", "0"][..],
            &["--cpu", "257"],
            &["--mem", "1048577"],
            &["--mem", "-1"],
            &["--seconds", "0"],
            &["--seconds", "86401"],
            &["--heartbeat", "-1"],
            &["--heartbeat", "86401"],
            &["--seconds"],
            &["--cpus", "1"],
            &["5"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        let most = Options {
            cpus: 1,
            mem_mib: MAX_MEM_MIB,
            seconds: 1,
            heartbeat: 0,
        };
        assert_eq!(most.mem_words(), (1 << 40) / 8);
    }

    #[test]
    fn verify_accepts_what_fill_wrote_in_any_split() {
        let mut buf = vec![0u64; 4096];
        fill(&mut buf, 0, 7);
        assert_eq!(verify(&buf, 0, 7), Ok(()));
        // Filled and verified chunk by chunk, at the right offsets.
        let mut chunked = vec![0u64; 4096];
        for (i, chunk) in chunked.chunks_mut(1000).enumerate() {
            fill(chunk, (i * 1000) as u64, 7);
        }
        assert_eq!(chunked, buf);
        for (i, chunk) in buf.chunks(300).enumerate() {
            assert_eq!(verify(chunk, (i * 300) as u64, 7), Ok(()));
        }
        assert!(verify(&buf[1..], 0, 7).is_err(), "offsets matter");
    }

    #[test]
    fn verify_finds_every_kind_of_corruption() {
        let mut buf = vec![0u64; 2048];
        fill(&mut buf, 0, 1);
        // A stale pass: every word differs from the next pass's.
        let stale = buf.clone();
        fill(&mut buf, 0, 2);
        assert!(stale.iter().zip(&buf).all(|(a, b)| a != b));
        assert_eq!(verify(&stale, 0, 2).unwrap_err().index, 0);
        // One flipped bit anywhere, found at its place.
        let mut x = 0x1234_5678_9abc_def1u64;
        for _ in 0..2_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let at = (x % buf.len() as u64) as usize;
            let mut bad = buf.clone();
            bad[at] ^= 1 << (x >> 58);
            let c = verify(&bad, 0, 2).unwrap_err();
            assert_eq!((c.index, c.found, c.wrote), (at as u64, bad[at], buf[at]));
        }
        let c = Corruption {
            index: 2,
            found: 1,
            wrote: 3,
        };
        assert_eq!(
            c.to_string(),
            "memory corrupted: word 2 (byte 0x10 of the buffer) holds \
             0x0000000000000001, wrote 0x0000000000000003"
        );
    }

    #[test]
    fn heartbeat_names_its_figures() {
        assert_eq!(
            heartbeat_line(15, 1234, 7),
            "stress: heartbeat 15 s, 1234 cpu rounds, 7 memory passes"
        );
    }

    #[test]
    fn cpu_rounds_check_out() {
        for round in (0..2500).chain([u64::MAX]) {
            assert_eq!(cpu_round(round), Ok(()), "round {round}");
        }
    }
}
