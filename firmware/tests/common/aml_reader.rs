//! A minimal AML reader, written from the ACPI 6.4 grammar (chapter 20),
//! for the subset a DSDT of named data objects uses: it builds a flat
//! namespace map from absolute paths (`\_SB_.PCI0._HID`) to values.

use std::collections::BTreeMap;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    Int(u64),
    Str(String),
    Buf(Vec<u8>),
    Pkg(Vec<Value>),
    Method { args: u8, body: Vec<u8> },
    Scope,
}

pub type Namespace = BTreeMap<String, Value>;

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

type R<T> = Result<T, String>;

impl Reader<'_> {
    fn byte(&mut self) -> R<u8> {
        let v = *self.b.get(self.pos).ok_or("unexpected end")?;
        self.pos += 1;
        Ok(v)
    }
    fn take(&mut self, n: usize) -> R<&[u8]> {
        let s = self.b.get(self.pos..self.pos + n).ok_or("unexpected end")?;
        self.pos += n;
        Ok(s)
    }
    fn le(&mut self, n: usize) -> R<u64> {
        Ok(self
            .take(n)?
            .iter()
            .rev()
            .fold(0, |acc, b| (acc << 8) | u64::from(*b)))
    }
    /// Returns the end offset of the package that starts here.
    fn pkg_end(&mut self) -> R<usize> {
        let start = self.pos;
        let lead = self.byte()?;
        let extra = usize::from(lead >> 6);
        let mut len = if extra == 0 {
            usize::from(lead & 0x3f)
        } else {
            usize::from(lead & 0x0f)
        };
        for i in 0..extra {
            len |= usize::from(self.byte()?) << (4 + 8 * i);
        }
        let end = start + len;
        if end > self.b.len() {
            return Err(format!("package at {start:#x} runs past the end"));
        }
        Ok(end)
    }
    fn seg(&mut self) -> R<String> {
        let s = self.take(4)?;
        String::from_utf8(s.to_vec()).map_err(|e| e.to_string())
    }
    /// An absolute path for the NameString here, relative to `scope`.
    fn name(&mut self, scope: &[String]) -> R<Vec<String>> {
        let mut path = scope.to_vec();
        match self.b.get(self.pos) {
            Some(b'\\') => {
                self.pos += 1;
                path.clear();
            }
            _ => {
                while self.b.get(self.pos) == Some(&b'^') {
                    self.pos += 1;
                    path.pop().ok_or("^ above the root")?;
                }
            }
        }
        let count = match self.byte()? {
            0x00 => 0,
            0x2e => 2,
            0x2f => usize::from(self.byte()?),
            _ => {
                self.pos -= 1;
                1
            }
        };
        for _ in 0..count {
            path.push(self.seg()?);
        }
        Ok(path)
    }
    fn data(&mut self) -> R<Value> {
        let op = self.byte()?;
        Ok(match op {
            0x00 => Value::Int(0),
            0x01 => Value::Int(1),
            0xff => Value::Int(u64::MAX),
            0x0a => Value::Int(self.le(1)?),
            0x0b => Value::Int(self.le(2)?),
            0x0c => Value::Int(self.le(4)?),
            0x0e => Value::Int(self.le(8)?),
            0x0d => {
                let rest = &self.b[self.pos..];
                let n = rest
                    .iter()
                    .position(|&c| c == 0)
                    .ok_or("unterminated string")?;
                let s = String::from_utf8(rest[..n].to_vec()).map_err(|e| e.to_string())?;
                self.pos += n + 1;
                Value::Str(s)
            }
            0x11 => {
                let end = self.pkg_end()?;
                let Value::Int(size) = self.data()? else {
                    return Err("buffer size not an integer".into());
                };
                let data = self.take(end - self.pos)?.to_vec();
                if data.len() as u64 != size {
                    return Err(format!("buffer size {size} but {} bytes", data.len()));
                }
                Value::Buf(data)
            }
            0x12 => {
                let end = self.pkg_end()?;
                let count = usize::from(self.byte()?);
                let mut elems = Vec::new();
                while self.pos < end {
                    elems.push(self.data()?);
                }
                if elems.len() != count || self.pos != end {
                    return Err(format!("package of {count} holds {} elements", elems.len()));
                }
                Value::Pkg(elems)
            }
            _ => {
                return Err(format!(
                    "unsupported data op {op:#x} at {:#x}",
                    self.pos - 1
                ))
            }
        })
    }
    fn terms(&mut self, end: usize, scope: &[String], ns: &mut Namespace) -> R<()> {
        while self.pos < end {
            let at = self.pos;
            let op = self.byte()?;
            match op {
                0x08 => {
                    let path = self.name(scope)?;
                    let v = self.data()?;
                    insert(ns, &path, v)?;
                }
                0x10 => {
                    let block_end = self.pkg_end()?;
                    let path = self.name(scope)?;
                    self.terms(block_end, &path, ns)?;
                }
                0x5b if self.b.get(self.pos) == Some(&0x82) => {
                    self.pos += 1;
                    let block_end = self.pkg_end()?;
                    let path = self.name(scope)?;
                    insert(ns, &path, Value::Scope)?;
                    self.terms(block_end, &path, ns)?;
                }
                0x14 => {
                    let block_end = self.pkg_end()?;
                    let path = self.name(scope)?;
                    let flags = self.byte()?;
                    let body = self.take(block_end - self.pos)?.to_vec();
                    insert(
                        ns,
                        &path,
                        Value::Method {
                            args: flags & 7,
                            body,
                        },
                    )?;
                }
                _ => return Err(format!("unsupported term op {op:#x} at {at:#x}")),
            }
        }
        if self.pos != end {
            return Err(format!("term list overran its end {end:#x}"));
        }
        Ok(())
    }
}

fn insert(ns: &mut Namespace, path: &[String], v: Value) -> R<()> {
    let key = format!("\\{}", path.join("."));
    if ns.insert(key.clone(), v).is_some() {
        return Err(format!("{key} defined twice"));
    }
    Ok(())
}

/// Parses a whole AML term list (a DSDT body without its header).
pub fn parse(aml: &[u8]) -> R<Namespace> {
    let mut ns = Namespace::new();
    let mut r = Reader { b: aml, pos: 0 };
    r.terms(aml.len(), &[], &mut ns)?;
    Ok(ns)
}

/// One resource descriptor of a resource template buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resource {
    Io {
        min: u16,
        max: u16,
        align: u8,
        len: u8,
    },
    Irq {
        mask: u16,
    },
    /// Word/DWord/QWord address space: resource type (0 memory, 1 I/O,
    /// 2 bus), general flags, type flags, min, max, length.
    Address {
        kind: u8,
        flags: u8,
        type_flags: u8,
        min: u64,
        max: u64,
        len: u64,
        width: usize,
    },
    Interrupt {
        flags: u8,
        gsis: Vec<u32>,
    },
    Other(u8),
}

/// Splits a resource template into descriptors, checking it ends with
/// exactly one end tag.
pub fn resources(buf: &[u8]) -> R<Vec<Resource>> {
    let mut out = Vec::new();
    let mut pos = 0;
    let le = |b: &[u8]| {
        b.iter()
            .rev()
            .fold(0u64, |acc, x| (acc << 8) | u64::from(*x))
    };
    loop {
        let tag = *buf.get(pos).ok_or("no end tag")?;
        let (kind, body) = if tag & 0x80 == 0 {
            let len = usize::from(tag & 7);
            (
                tag >> 3,
                buf.get(pos + 1..pos + 1 + len).ok_or("short small item")?,
            )
        } else {
            let len = le(buf.get(pos + 1..pos + 3).ok_or("short large item")?) as usize;
            (
                tag,
                buf.get(pos + 3..pos + 3 + len).ok_or("short large item")?,
            )
        };
        pos += 1 + body.len() + if tag & 0x80 == 0 { 0 } else { 2 };
        let r = match kind {
            0x0f => {
                if pos != buf.len() {
                    return Err("bytes after the end tag".into());
                }
                return Ok(out);
            }
            0x04 => Resource::Irq {
                mask: le(&body[..2]) as u16,
            },
            0x08 => Resource::Io {
                min: le(&body[1..3]) as u16,
                max: le(&body[3..5]) as u16,
                align: body[5],
                len: body[6],
            },
            0x87 | 0x88 | 0x8a => {
                let width = match kind {
                    0x88 => 2,
                    0x87 => 4,
                    _ => 8,
                };
                let f = |i: usize| le(&body[3 + i * width..3 + (i + 1) * width]);
                Resource::Address {
                    kind: body[0],
                    flags: body[1],
                    type_flags: body[2],
                    min: f(1),
                    max: f(2),
                    len: f(4),
                    width,
                }
            }
            0x89 => {
                let n = usize::from(body[1]);
                let gsis = (0..n)
                    .map(|i| le(&body[2 + 4 * i..6 + 4 * i]) as u32)
                    .collect();
                Resource::Interrupt {
                    flags: body[0],
                    gsis,
                }
            }
            k => Resource::Other(k),
        };
        out.push(r);
    }
}

/// Expands a compressed EISA ID integer back to its text.
pub fn eisa_text(v: u64) -> String {
    let b = (v as u32).to_le_bytes();
    let letters = u16::from_be_bytes([b[0], b[1]]);
    let l = |shift: u16| char::from(b'@' + ((letters >> shift) & 0x1f) as u8);
    format!("{}{}{}{:02X}{:02X}", l(10), l(5), l(0), b[2], b[3])
}
