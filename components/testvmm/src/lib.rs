//! The test VMM's logic, apart from the kernel calls: guest setup
//! ([`setup`]), exit handling ([`vmm`]), the decoder for the instructions
//! behind the exits ([`decode`]) and the debug-port line collector
//! ([`line`]). Tested on the host: `cargo test -p moat-testvmm --lib`.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

pub mod decode;
pub mod line;
pub mod setup;
pub mod vmm;

use moat_testvm::TestGuest;

/// The guests a `guests=a,b,…` argument names, in the order of
/// [`moat_testvm::all`]; all of them without the argument. Err: a name no
/// guest has.
pub fn select<'a>(
    list: Option<&'a str>,
) -> Result<impl Iterator<Item = &'static TestGuest> + 'a, &'a str> {
    if let Some(unknown) = list
        .into_iter()
        .flat_map(|l| l.split(','))
        .find(|name| moat_testvm::find(name).is_none())
    {
        return Err(unknown);
    }
    Ok(moat_testvm::all()
        .iter()
        .filter(move |g| list.is_none_or(|l| l.split(',').any(|name| name == g.name))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: Option<&str>) -> Result<Vec<&'static str>, &str> {
        select(list).map(|guests| guests.map(|g| g.name).collect())
    }

    #[test]
    fn selection() {
        assert_eq!(names(None).unwrap().len(), moat_testvm::all().len());
        assert_eq!(names(Some("nogive,modes")), Ok(vec!["modes", "nogive"]));
        assert_eq!(names(Some("modes,bogus")), Err("bogus"));
        assert_eq!(names(Some("")), Err(""));
    }
}
