//! Command lines: `--flag VALUE` or `--flag=VALUE`, positional words, `--`
//! before a positional word that starts with `--`, and `-h`/`--help`.

use std::fmt::Display;
use std::ops::RangeInclusive;
use std::str::FromStr;

/// The exit code of a usage error.
pub const EXIT_USAGE: u8 = 2;

/// What a command line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed<T> {
    Help,
    Run(T),
}

/// A bad command line, with what is wrong with it.
#[derive(Debug, PartialEq, Eq)]
pub struct UsageError(pub String);

impl UsageError {
    pub fn unknown_flag(name: &str) -> UsageError {
        UsageError(format!("unknown option --{name}"))
    }
}

/// The start of every tool's `main`: parses the process's arguments with
/// `parse`; on `--help` prints `usage` and gives exit code 0, on a usage
/// error prints it with `usage` (as `name: ...`) and gives 2.
pub fn run_or_exit<T>(
    name: &str,
    usage: &str,
    parse: impl FnOnce(&[String]) -> Result<Parsed<T>, UsageError>,
) -> Result<T, std::process::ExitCode> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match parse(&args) {
        Ok(Parsed::Run(opts)) => Ok(opts),
        Ok(Parsed::Help) => {
            print!("{usage}");
            Err(std::process::ExitCode::SUCCESS)
        }
        Err(e) => {
            eprint!("{name}: {}\n{usage}", e.0);
            Err(std::process::ExitCode::from(EXIT_USAGE))
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Word<'a> {
    Help,
    /// A flag's name without the dashes, and its value if given inline.
    Flag(&'a str, Option<&'a str>),
    Positional(&'a str),
}

/// The words of a command line, one at a time.
pub struct Words<'a> {
    rest: &'a [String],
    flags_done: bool,
}

impl<'a> Words<'a> {
    pub fn new(args: &'a [String]) -> Self {
        Words {
            rest: args,
            flags_done: false,
        }
    }

    pub fn next_word(&mut self) -> Option<Word<'a>> {
        let (first, rest) = self.rest.split_first()?;
        self.rest = rest;
        if self.flags_done {
            return Some(Word::Positional(first));
        }
        Some(match first.as_str() {
            "--" => {
                self.flags_done = true;
                return self.next_word();
            }
            "-h" | "--help" => Word::Help,
            word => match word.strip_prefix("--") {
                Some(flag) => match flag.split_once('=') {
                    Some((name, value)) => Word::Flag(name, Some(value)),
                    None => Word::Flag(flag, None),
                },
                None => Word::Positional(word),
            },
        })
    }

    /// The value of the flag `name` just read: inline, or the next word.
    pub fn value(&mut self, name: &str, inline: Option<&'a str>) -> Result<&'a str, UsageError> {
        if let Some(value) = inline {
            return Ok(value);
        }
        let (first, rest) = self
            .rest
            .split_first()
            .ok_or_else(|| UsageError(format!("--{name} needs a value")))?;
        self.rest = rest;
        Ok(first)
    }

    /// The value of the flag `name`, as a number within `range`.
    pub fn number<T>(
        &mut self,
        name: &str,
        inline: Option<&'a str>,
        range: RangeInclusive<T>,
    ) -> Result<T, UsageError>
    where
        T: FromStr + PartialOrd + Display,
    {
        let text = self.value(name, inline)?;
        text.parse()
            .ok()
            .filter(|v| range.contains(v))
            .ok_or_else(|| {
                UsageError(format!(
                    "--{name}: `{text}` is not a number from {} to {}",
                    range.start(),
                    range.end()
                ))
            })
    }
}

/// A command line as the tests write it.
#[cfg(test)]
pub(crate) fn line(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| w.to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_flags_values_and_positionals() {
        let args = line(&["--a", "1", "--b=2", "x", "-h", "--", "--c", "-h"]);
        let mut w = Words::new(&args);
        assert_eq!(w.next_word(), Some(Word::Flag("a", None)));
        assert_eq!(w.value("a", None), Ok("1"));
        assert_eq!(w.next_word(), Some(Word::Flag("b", Some("2"))));
        assert_eq!(w.value("b", Some("2")), Ok("2"));
        assert_eq!(w.next_word(), Some(Word::Positional("x")));
        assert_eq!(w.next_word(), Some(Word::Help));
        assert_eq!(w.next_word(), Some(Word::Positional("--c")));
        assert_eq!(w.next_word(), Some(Word::Positional("-h")));
        assert_eq!(w.next_word(), None);
        assert!(w.value("d", None).is_err(), "no word left for the value");
    }

    #[test]
    fn numbers_are_checked_against_their_range() {
        let args = line(&["7", "0", "-1", "x", "99999999999999999999999", ""]);
        let mut w = Words::new(&args);
        assert_eq!(w.number("n", None, 1u32..=10), Ok(7));
        assert!(w.number("n", None, 1u32..=10).is_err(), "below the range");
        for _ in 0..4 {
            assert!(w.number("n", None, 0u64..=u64::MAX).is_err());
        }
        assert_eq!(w.number("n", Some("10"), 1u32..=10), Ok(10));
        let err = w.number("n", Some("11"), 1u32..=10).unwrap_err();
        assert_eq!(err.0, "--n: `11` is not a number from 1 to 10");
    }
}
