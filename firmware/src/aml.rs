//! A small AML encoder (ACPI 6.x, chapter 20) for the objects a VMM's DSDT
//! needs: names, integers, strings, buffers, packages, scopes, devices,
//! methods, and resource templates (chapter 6.4).
//!
//! Every function returns the encoded bytes of one term; callers compose
//! term lists by concatenation.

use alloc::vec::Vec;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// A name path that is not `\`/`^` prefixes and 1-4 character segments
    /// of `A-Z`, `0-9`, `_` (not starting with a digit).
    BadName,
    /// A string with NUL or non-ASCII characters, or a bad EISA ID.
    BadString,
    /// An object beyond what a package length (2^28 bytes) can hold.
    TooLong,
    /// More package elements than a fixed package holds (255).
    TooManyElements,
    /// An ISA IRQ above 15 or a method with more than 7 arguments.
    OutOfRange,
}

mod op {
    pub const ZERO: u8 = 0x00;
    pub const ONE: u8 = 0x01;
    pub const NAME: u8 = 0x08;
    pub const BYTE: u8 = 0x0a;
    pub const WORD: u8 = 0x0b;
    pub const DWORD: u8 = 0x0c;
    pub const STRING: u8 = 0x0d;
    pub const QWORD: u8 = 0x0e;
    pub const SCOPE: u8 = 0x10;
    pub const BUFFER: u8 = 0x11;
    pub const PACKAGE: u8 = 0x12;
    pub const METHOD: u8 = 0x14;
    pub const DUAL_NAME: u8 = 0x2e;
    pub const MULTI_NAME: u8 = 0x2f;
    pub const ROOT: u8 = b'\\';
    pub const PARENT: u8 = b'^';
    pub const EXT: u8 = 0x5b;
    pub const DEVICE: u8 = 0x82;
    pub const RETURN: u8 = 0xa4;
}

/// PkgLength (20.2.4): the length of `body` plus the encoding itself,
/// in 1 to 4 bytes.
fn with_pkg_length(prefix: &[u8], body: &[u8]) -> Result<Vec<u8>, Error> {
    for n in 1..=4usize {
        let total = body.len() + n;
        // One byte holds 6 bits; each further byte adds 8 after a 4-bit nibble.
        let limit = if n == 1 {
            1 << 6
        } else {
            1 << (4 + 8 * (n - 1))
        };
        if total < limit {
            let mut out = Vec::with_capacity(prefix.len() + total);
            out.extend_from_slice(prefix);
            if n == 1 {
                out.push(total as u8);
            } else {
                out.push((((n - 1) as u8) << 6) | (total & 0xf) as u8);
                for i in 0..n - 1 {
                    out.push((total >> (4 + 8 * i)) as u8);
                }
            }
            out.extend_from_slice(body);
            return Ok(out);
        }
    }
    Err(Error::TooLong)
}

fn name_seg(seg: &str) -> Result<[u8; 4], Error> {
    let b = seg.as_bytes();
    let lead_ok = b
        .first()
        .is_some_and(|c| c.is_ascii_uppercase() || *c == b'_');
    let rest_ok = b
        .iter()
        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == b'_');
    if !lead_ok || !rest_ok || b.len() > 4 {
        return Err(Error::BadName);
    }
    let mut out = [b'_'; 4];
    out[..b.len()].copy_from_slice(b);
    Ok(out)
}

/// NameString (20.2.2): `\` and `^` prefixes, then dot-separated segments,
/// each padded with `_` to four characters.
pub fn name_string(path: &str) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    let mut rest = path;
    if let Some(r) = rest.strip_prefix('\\') {
        out.push(op::ROOT);
        rest = r;
    } else {
        while let Some(r) = rest.strip_prefix('^') {
            out.push(op::PARENT);
            rest = r;
        }
    }
    if rest.is_empty() {
        if out.first() != Some(&op::ROOT) {
            return Err(Error::BadName);
        }
        out.push(op::ZERO); // NullName: the root itself
        return Ok(out);
    }
    let segs = rest
        .split('.')
        .map(name_seg)
        .collect::<Result<Vec<_>, _>>()?;
    match segs.len() {
        1 => {}
        2 => out.push(op::DUAL_NAME),
        n => {
            out.push(op::MULTI_NAME);
            out.push(u8::try_from(n).map_err(|_| Error::BadName)?);
        }
    }
    segs.iter().for_each(|s| out.extend_from_slice(s));
    Ok(out)
}

/// An integer constant in its shortest encoding.
pub fn integer(v: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(9);
    match v {
        0 => out.push(op::ZERO),
        1 => out.push(op::ONE),
        _ if v <= 0xff => out.extend_from_slice(&[op::BYTE, v as u8]),
        _ if v <= 0xffff => {
            out.push(op::WORD);
            out.extend_from_slice(&(v as u16).to_le_bytes());
        }
        _ if v <= 0xffff_ffff => {
            out.push(op::DWORD);
            out.extend_from_slice(&(v as u32).to_le_bytes());
        }
        _ => {
            out.push(op::QWORD);
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out
}

/// A compressed EISA ID such as `PNP0A08` (three letters, four hex
/// digits), as the DWord ASL's `EisaId()` produces.
pub fn eisa_id(id: &str) -> Result<Vec<u8>, Error> {
    let b = id.as_bytes();
    if b.len() != 7 || !b[..3].iter().all(u8::is_ascii_uppercase) {
        return Err(Error::BadString);
    }
    let hex = u16::from_str_radix(&id[3..], 16).map_err(|_| Error::BadString)?;
    let letters = b[..3]
        .iter()
        .fold(0u16, |acc, c| (acc << 5) | u16::from(c - b'@'));
    let mut bytes = [0u8; 4];
    bytes[..2].copy_from_slice(&letters.to_be_bytes());
    bytes[2..].copy_from_slice(&hex.to_be_bytes());
    let mut out = Vec::from([op::DWORD]);
    out.extend_from_slice(&bytes);
    Ok(out)
}

/// A string constant (ASCII 0x01..=0x7f).
pub fn string(s: &str) -> Result<Vec<u8>, Error> {
    if !s.bytes().all(|c| (0x01..=0x7f).contains(&c)) {
        return Err(Error::BadString);
    }
    let mut out = Vec::from([op::STRING]);
    out.extend_from_slice(s.as_bytes());
    out.push(0);
    Ok(out)
}

pub fn buffer(data: &[u8]) -> Result<Vec<u8>, Error> {
    let mut body = integer(data.len() as u64);
    body.extend_from_slice(data);
    with_pkg_length(&[op::BUFFER], &body)
}

/// A package of already encoded data objects.
pub fn package(elements: &[Vec<u8>]) -> Result<Vec<u8>, Error> {
    let count = u8::try_from(elements.len()).map_err(|_| Error::TooManyElements)?;
    let mut body = Vec::from([count]);
    elements.iter().for_each(|e| body.extend_from_slice(e));
    with_pkg_length(&[op::PACKAGE], &body)
}

/// `Name(path, value)`.
pub fn name(path: &str, value: &[u8]) -> Result<Vec<u8>, Error> {
    let mut out = Vec::from([op::NAME]);
    out.extend_from_slice(&name_string(path)?);
    out.extend_from_slice(value);
    Ok(out)
}

fn named_block(prefix: &[u8], path: &str, header: &[u8], body: &[u8]) -> Result<Vec<u8>, Error> {
    let mut inner = name_string(path)?;
    inner.extend_from_slice(header);
    inner.extend_from_slice(body);
    with_pkg_length(prefix, &inner)
}

/// `Scope(path) { body }`.
pub fn scope(path: &str, body: &[u8]) -> Result<Vec<u8>, Error> {
    named_block(&[op::SCOPE], path, &[], body)
}

/// `Device(path) { body }`.
pub fn device(path: &str, body: &[u8]) -> Result<Vec<u8>, Error> {
    named_block(&[op::EXT, op::DEVICE], path, &[], body)
}

/// `Method(path, args, NotSerialized/Serialized) { body }`.
pub fn method(path: &str, args: u8, serialized: bool, body: &[u8]) -> Result<Vec<u8>, Error> {
    const SERIALIZED: u8 = 1 << 3;
    if args > 7 {
        return Err(Error::OutOfRange);
    }
    let flags = args | if serialized { SERIALIZED } else { 0 };
    named_block(&[op::METHOD], path, &[flags], body)
}

/// `Return(value)`.
pub fn ret(value: &[u8]) -> Vec<u8> {
    let mut out = Vec::from([op::RETURN]);
    out.extend_from_slice(value);
    out
}

/// `ResourceTemplate() { descriptors }`: a buffer closed by an end tag.
/// Its checksum byte is 0, which the spec defines as "treat as valid".
pub fn resource_template(descriptors: &[Vec<u8>]) -> Result<Vec<u8>, Error> {
    const END_TAG: [u8; 2] = [0x79, 0x00];
    let mut data: Vec<u8> = descriptors.concat();
    data.extend_from_slice(&END_TAG);
    buffer(&data)
}

/// Resource descriptors (ACPI 6.4.2 small, 6.4.3 large).
pub mod resource {
    use alloc::vec::Vec;

    use super::Error;

    /// Who owns an address range: a bridge passing it on to its children
    /// (`Producer`) or a device using it (`Consumer`).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Usage {
        Producer,
        Consumer,
    }

    const IO: u8 = 0x47;
    const DECODE_16: u8 = 1;
    const IRQ: u8 = 0x22;
    const DWORD_ADDRESS: u8 = 0x87;
    const WORD_ADDRESS: u8 = 0x88;
    const EXT_INTERRUPT: u8 = 0x89;
    const QWORD_ADDRESS: u8 = 0x8a;

    const RANGE_MEMORY: u8 = 0;
    const RANGE_IO: u8 = 1;
    const RANGE_BUS: u8 = 2;
    // General flags: consumer, subtractive decode, min fixed, max fixed.
    const CONSUMER: u8 = 1 << 0;
    const MIN_FIXED: u8 = 1 << 2;
    const MAX_FIXED: u8 = 1 << 3;
    // Type-specific flags.
    const IO_ENTIRE_RANGE: u8 = 3;
    const MEM_READ_WRITE: u8 = 1 << 0;
    // Extended interrupt flags.
    const INT_EDGE: u8 = 1 << 1;
    const INT_ACTIVE_LOW: u8 = 1 << 2;
    const INT_SHARED: u8 = 1 << 3;

    /// `IO(Decode16, base, base, 1, len)`: a fixed port range.
    pub fn io(base: u16, len: u8) -> Vec<u8> {
        let [lo, hi] = base.to_le_bytes();
        Vec::from([IO, DECODE_16, lo, hi, lo, hi, 1, len])
    }

    /// `IRQNoFlags() { irq }`: one ISA IRQ, edge-triggered, active high.
    pub fn irq(irq: u8) -> Result<Vec<u8>, Error> {
        let mask = 1u16.checked_shl(u32::from(irq)).ok_or(Error::OutOfRange)?;
        let [lo, hi] = mask.to_le_bytes();
        Ok(Vec::from([IRQ, lo, hi]))
    }

    /// `Interrupt(ResourceConsumer, ...) { gsi }`.
    pub fn interrupt(gsi: u32, edge: bool, active_low: bool, shared: bool) -> Vec<u8> {
        let mut flags = CONSUMER;
        for (set, bit) in [
            (edge, INT_EDGE),
            (active_low, INT_ACTIVE_LOW),
            (shared, INT_SHARED),
        ] {
            if set {
                flags |= bit;
            }
        }
        let mut out = Vec::from([EXT_INTERRUPT, 6, 0, flags, 1]);
        out.extend_from_slice(&gsi.to_le_bytes());
        out
    }

    fn general_flags(usage: Usage) -> u8 {
        MIN_FIXED
            | MAX_FIXED
            | if usage == Usage::Consumer {
                CONSUMER
            } else {
                0
            }
    }

    /// An address space descriptor with fixed `[min, max]`, granularity 0
    /// and no translation; `N` is the field width in bytes.
    fn address<const N: usize>(
        tag: u8,
        kind: u8,
        flags: u8,
        type_flags: u8,
        min: u64,
        max: u64,
    ) -> Result<Vec<u8>, Error> {
        let len = max
            .checked_sub(min)
            .and_then(|d| d.checked_add(1))
            .ok_or(Error::OutOfRange)?;
        let fits = |v: u64| N == 8 || v >> (8 * N) == 0;
        if !fits(max) || !fits(len) {
            return Err(Error::OutOfRange);
        }
        let body_len = 3 + 5 * N as u16;
        let mut out = Vec::from([tag]);
        out.extend_from_slice(&body_len.to_le_bytes());
        out.extend_from_slice(&[kind, flags, type_flags]);
        for field in [0, min, max, 0, len] {
            out.extend_from_slice(&field.to_le_bytes()[..N]);
        }
        Ok(out)
    }

    /// `WordBusNumber(ResourceProducer, MinFixed, MaxFixed, PosDecode, ...)`
    /// for buses `first..=last`.
    pub fn word_bus_number(first: u16, last: u16) -> Result<Vec<u8>, Error> {
        address::<2>(
            WORD_ADDRESS,
            RANGE_BUS,
            general_flags(Usage::Producer),
            0,
            first.into(),
            last.into(),
        )
    }

    /// `WordIO(ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, ...)`
    /// for ports `first..=last`.
    pub fn word_io(first: u16, last: u16) -> Result<Vec<u8>, Error> {
        let flags = general_flags(Usage::Producer);
        address::<2>(
            WORD_ADDRESS,
            RANGE_IO,
            flags,
            IO_ENTIRE_RANGE,
            first.into(),
            last.into(),
        )
    }

    fn memory<const N: usize>(
        tag: u8,
        usage: Usage,
        base: u64,
        size: u64,
    ) -> Result<Vec<u8>, Error> {
        let max = size
            .checked_sub(1)
            .and_then(|s| base.checked_add(s))
            .ok_or(Error::OutOfRange)?;
        address::<N>(
            tag,
            RANGE_MEMORY,
            general_flags(usage),
            MEM_READ_WRITE,
            base,
            max,
        )
    }

    /// `DWordMemory(usage, PosDecode, MinFixed, MaxFixed, NonCacheable,
    /// ReadWrite, ...)` for `size` bytes at `base`, below 4 GiB.
    pub fn dword_memory(usage: Usage, base: u64, size: u64) -> Result<Vec<u8>, Error> {
        memory::<4>(DWORD_ADDRESS, usage, base, size)
    }

    /// `QWordMemory(...)`, as [`dword_memory`] with 64-bit fields.
    pub fn qword_memory(usage: Usage, base: u64, size: u64) -> Result<Vec<u8>, Error> {
        memory::<8>(QWORD_ADDRESS, usage, base, size)
    }
}

#[cfg(test)]
mod tests {
    use super::resource::*;
    use super::*;

    // Expected bytes below were checked against the ACPI 6.4 grammar and
    // against what ACPICA's iasl 20200925 emits for the same ASL.

    #[test]
    fn names() {
        assert_eq!(name_string("_HID").unwrap(), b"_HID");
        assert_eq!(name_string("W").unwrap(), b"W___");
        assert_eq!(name_string("\\_SB.PCI0").unwrap(), b"\\\x2e_SB_PCI0");
        assert_eq!(
            name_string("_SB.PCI0.ABCD").unwrap(),
            b"\x2f\x03_SB_PCI0ABCD"
        );
        assert_eq!(name_string("^^FOO").unwrap(), b"^^FOO_");
        assert_eq!(name_string("\\").unwrap(), b"\\\x00");
        for bad in [
            "", "^", "abcd", "TOOLONG", "1ABC", "A..B", "\\^A", "A-B", "_SB.",
        ] {
            assert_eq!(name_string(bad), Err(Error::BadName), "{bad}");
        }
    }

    #[test]
    fn integers_take_the_shortest_form() {
        assert_eq!(integer(0), [0x00]);
        assert_eq!(integer(1), [0x01]);
        assert_eq!(integer(0x0f), [0x0a, 0x0f]);
        assert_eq!(integer(0x1234), [0x0b, 0x34, 0x12]);
        assert_eq!(integer(0xc000_0000), [0x0c, 0, 0, 0, 0xc0]);
        assert_eq!(
            integer(0x1_2345_6789),
            [0x0e, 0x89, 0x67, 0x45, 0x23, 0x01, 0, 0, 0]
        );
    }

    #[test]
    fn data_objects() {
        assert_eq!(string("COM1").unwrap(), b"\x0dCOM1\x00");
        assert_eq!(string("a\0b"), Err(Error::BadString));
        assert_eq!(string("é"), Err(Error::BadString));
        assert_eq!(
            buffer(&[1, 2, 3]).unwrap(),
            [0x11, 0x06, 0x0a, 0x03, 1, 2, 3]
        );
        assert_eq!(eisa_id("PNP0A08").unwrap(), [0x0c, 0x41, 0xd0, 0x0a, 0x08]);
        assert_eq!(eisa_id("PNP0A03").unwrap(), [0x0c, 0x41, 0xd0, 0x0a, 0x03]);
        assert_eq!(eisa_id("PNP0501").unwrap(), [0x0c, 0x41, 0xd0, 0x05, 0x01]);
        assert_eq!(eisa_id("pnp0A03"), Err(Error::BadString));
        assert_eq!(eisa_id("PNP0A0G"), Err(Error::BadString));
        assert_eq!(eisa_id("PNP0A0"), Err(Error::BadString));
        let s5 = name(
            "_S5_",
            &package(&[integer(5), integer(0), integer(0), integer(0)]).unwrap(),
        )
        .unwrap();
        assert_eq!(s5, b"\x08_S5_\x12\x07\x04\x0a\x05\x00\x00\x00");
        assert_eq!(package(&vec![integer(0); 256]), Err(Error::TooManyElements));
    }

    #[test]
    fn package_lengths_grow_with_the_body() {
        // 1 byte up to 63 in total, then the low nibble plus further bytes.
        // 60 data + 2 (ByteConst size) + 1 = 63; one more needs two bytes.
        assert_eq!(buffer(&[0; 60]).unwrap()[..3], [0x11, 0x3f, 0x0a]);
        assert_eq!(buffer(&[0; 61]).unwrap()[..4], [0x11, 0x41, 0x04, 0x0a]);
        let big = buffer(&[0; 0x1_0000]).unwrap();
        // 0x10000 data + 5 (DWordConst size) + 3 (PkgLength) = 0x10008.
        assert_eq!(big[..5], [0x11, 0x88, 0x00, 0x10, 0x0c]);
        assert_eq!(big.len(), 1 + 0x1_0008);
    }

    #[test]
    fn blocks() {
        let sta = method("_STA", 0, false, &ret(&integer(0x0f))).unwrap();
        assert_eq!(sta, b"\x14\x09_STA\x00\xa4\x0a\x0f");
        assert_eq!(method("_XYZ", 8, false, &[]), Err(Error::OutOfRange));
        assert_eq!(method("M", 2, true, &[]).unwrap(), b"\x14\x06M___\x0a");
        let dev = device("PCI0", &name("_SEG", &integer(0)).unwrap()).unwrap();
        assert_eq!(dev, b"\x5b\x82\x0b\x50\x43\x49\x30\x08_SEG\x00");
        let sc = scope("\\_SB", &dev).unwrap();
        assert_eq!(sc[..7], *b"\x10\x13\\_SB_");
        assert_eq!(sc[7..], dev[..]);
    }

    #[test]
    fn resource_descriptors() {
        assert_eq!(
            io(0xcf8, 8),
            [0x47, 0x01, 0xf8, 0x0c, 0xf8, 0x0c, 0x01, 0x08]
        );
        assert_eq!(irq(4).unwrap(), [0x22, 0x10, 0x00]);
        assert_eq!(irq(16), Err(Error::OutOfRange));
        assert_eq!(
            interrupt(16, false, true, true),
            [0x89, 0x06, 0x00, 0x0d, 0x01, 0x10, 0, 0, 0]
        );
        assert_eq!(
            word_bus_number(0, 0).unwrap(),
            [0x88, 0x0d, 0x00, 0x02, 0x0c, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0x00]
        );
        assert_eq!(
            word_io(0, 0xcf7).unwrap(),
            [0x88, 0x0d, 0x00, 0x01, 0x0c, 0x03, 0, 0, 0, 0, 0xf7, 0x0c, 0, 0, 0xf8, 0x0c]
        );
        assert_eq!(word_io(0xd00, 0xffff).unwrap()[14..], [0x00, 0xf3]);
        assert_eq!(word_io(2, 1), Err(Error::OutOfRange));
        let mut dword = Vec::from([0x87, 0x17, 0x00, 0x00, 0x0c, 0x01, 0, 0, 0, 0]);
        dword.extend_from_slice(&[
            0, 0, 0, 0xc0, 0xff, 0xff, 0xff, 0xdf, 0, 0, 0, 0, 0, 0, 0, 0x20,
        ]);
        assert_eq!(
            dword_memory(Usage::Producer, 0xc000_0000, 0x2000_0000).unwrap(),
            dword
        );
        assert_eq!(
            dword_memory(Usage::Producer, 0xf000_0000, 0x2000_0000),
            Err(Error::OutOfRange)
        );
        assert_eq!(dword_memory(Usage::Producer, 0, 0), Err(Error::OutOfRange));
        let q = qword_memory(Usage::Consumer, 0xe000_0000, 0x10_0000).unwrap();
        assert_eq!(q[..6], [0x8a, 0x2b, 0x00, 0x00, 0x0d, 0x01]);
        assert_eq!(q[14..22], 0xe000_0000u64.to_le_bytes());
        assert_eq!(q[22..30], 0xe00f_ffffu64.to_le_bytes());
        assert_eq!(q[38..46], 0x10_0000u64.to_le_bytes());
        assert_eq!(q.len(), 46);
        assert_eq!(
            qword_memory(Usage::Consumer, u64::MAX, 2),
            Err(Error::OutOfRange)
        );
        let t = resource_template(&[irq(4).unwrap()]).unwrap();
        assert_eq!(t, [0x11, 0x08, 0x0a, 0x05, 0x22, 0x10, 0x00, 0x79, 0x00]);
    }
}
