//! Collects the bytes a guest writes to the debug port into lines.

/// Longest line kept; longer ones are cut into pieces of this size.
pub const LINE_MAX: usize = 120;

pub struct Line {
    bytes: [u8; LINE_MAX],
    len: usize,
}

impl Default for Line {
    fn default() -> Self {
        Self::new()
    }
}

impl Line {
    pub const fn new() -> Self {
        Self {
            bytes: [0; LINE_MAX],
            len: 0,
        }
    }

    /// Adds one byte; returns a complete line (without its `\n`) when the
    /// byte ends one or fills the buffer. Bytes other than printable
    /// ASCII become `?`, so a line is always valid text.
    pub fn push(&mut self, byte: u8) -> Option<&str> {
        if byte == b'\n' {
            return Some(self.take());
        }
        if byte == b'\r' {
            return None;
        }
        self.bytes[self.len] = printable(byte);
        self.len += 1;
        // A full buffer is handed out as a line of its own.
        (self.len == LINE_MAX).then(|| self.take())
    }

    /// The unfinished line, if any (for when the guest stops).
    pub fn flush(&mut self) -> Option<&str> {
        (self.len > 0).then(|| self.take())
    }

    fn take(&mut self) -> &str {
        let len = core::mem::take(&mut self.len);
        as_str(&self.bytes[..len])
    }
}

fn printable(byte: u8) -> u8 {
    if byte.is_ascii_graphic() || byte == b' ' {
        byte
    } else {
        b'?'
    }
}

fn as_str(bytes: &[u8]) -> &str {
    // Only printable ASCII is ever stored.
    core::str::from_utf8(bytes).unwrap_or("?")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(line: &mut Line, bytes: &[u8]) -> Vec<String> {
        bytes
            .iter()
            .filter_map(|&b| line.push(b).map(String::from))
            .collect()
    }

    #[test]
    fn lines_end_at_newline() {
        let mut line = Line::new();
        assert_eq!(feed(&mut line, b"real"), Vec::<String>::new());
        assert_eq!(feed(&mut line, b" ok\r\nnext\n"), ["real ok", "next"]);
        assert_eq!(line.flush(), None);
        assert_eq!(feed(&mut line, b"\n"), [""]);
    }

    #[test]
    fn unfinished_lines_are_flushed() {
        let mut line = Line::new();
        feed(&mut line, b"half");
        assert_eq!(line.flush(), Some("half"));
        assert_eq!(line.flush(), None);
    }

    #[test]
    fn garbage_becomes_question_marks_and_long_lines_are_cut() {
        let mut line = Line::new();
        let bytes: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let lines = feed(&mut line, &bytes);
        for l in &lines {
            assert!(l.len() <= LINE_MAX);
            assert!(l.bytes().all(|b| b == b' ' || b.is_ascii_graphic()));
        }
        let mut line = Line::new();
        let long = [b'x'; LINE_MAX * 2 + 3];
        let lines = feed(&mut line, &long);
        assert_eq!(lines.len(), 2);
        assert_eq!(line.flush().map(str::len), Some(3));
    }
}
