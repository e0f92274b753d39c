//! The root task's boot manifest parser on arbitrary text.

/// Any bytes, as the manifest boot module would hold them (invalid UTF-8
/// replaced, as the root task only parses text).
pub fn parse(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Err(error) = moat_roottask::manifest::parse(&text) {
        // The message is printed at boot: formatting it must not panic.
        let _ = error.to_string();
    }
}
