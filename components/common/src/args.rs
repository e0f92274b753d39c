//! Component arguments: whitespace-separated words, `key=value` or bare flags.

/// The value of `key=value`, the last one if repeated.
pub fn value<'a>(args: &'a str, key: &str) -> Option<&'a str> {
    args.split_whitespace()
        .rev()
        .filter_map(|word| word.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

/// Whether the bare word `flag` is present.
pub fn flag(args: &str, flag: &str) -> bool {
    args.split_whitespace().any(|word| word == flag)
}

/// A number given as `key=N` (decimal, or hex with `0x`), else `default`.
/// A value that does not parse is an error, so a typo is not silently ignored.
pub fn number(args: &str, key: &str, default: u64) -> Result<u64, BadNumber> {
    match value(args, key) {
        None => Ok(default),
        Some(text) => parse_number(text).ok_or(BadNumber),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadNumber;

pub fn parse_number(text: &str) -> Option<u64> {
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

/// The TSC frequency the root task passes as `tsc_hz=`; 1 GHz if absent.
pub fn tsc_hz(args: &str) -> u64 {
    number(args, "tsc_hz", DEFAULT_TSC_HZ)
        .ok()
        .filter(|&hz| hz > 0)
        .unwrap_or(DEFAULT_TSC_HZ)
}

pub const DEFAULT_TSC_HZ: u64 = 1_000_000_000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_and_flags() {
        let args = "calls=10 bench seed=0x2a calls=12";
        assert_eq!(value(args, "calls"), Some("12"));
        assert_eq!(value(args, "bench"), None);
        assert!(flag(args, "bench"));
        assert!(!flag(args, "calls"));
        assert_eq!(number(args, "seed", 0), Ok(42));
        assert_eq!(number(args, "missing", 7), Ok(7));
        assert_eq!(number("n=x", "n", 7), Err(BadNumber));
        assert_eq!(parse_number("0xff"), Some(255));
        assert_eq!(parse_number(&"9".repeat(40)), None);
    }

    #[test]
    fn tsc_frequency_defaults() {
        assert_eq!(tsc_hz(""), DEFAULT_TSC_HZ);
        assert_eq!(tsc_hz("tsc_hz=0"), DEFAULT_TSC_HZ);
        assert_eq!(tsc_hz("tsc_hz=2599000000"), 2_599_000_000);
    }
}
