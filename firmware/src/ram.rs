//! Bounds-checked access to guest RAM given as a byte slice whose index is
//! the guest-physical address, and little-endian field access to images.

/// A write (or read) that would leave guest RAM: `len` bytes at `addr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutOfRam {
    pub addr: u64,
    pub len: u64,
}

fn range(ram_len: usize, addr: u64, len: usize) -> Result<core::ops::Range<usize>, OutOfRam> {
    let err = OutOfRam {
        addr,
        len: len as u64,
    };
    let start = usize::try_from(addr).map_err(|_| err)?;
    let end = start.checked_add(len).ok_or(err)?;
    if end > ram_len {
        return Err(err);
    }
    Ok(start..end)
}

/// The `len` bytes of `ram` at `addr`, for writing.
pub fn slice_mut(ram: &mut [u8], addr: u64, len: usize) -> Result<&mut [u8], OutOfRam> {
    let r = range(ram.len(), addr, len)?;
    Ok(&mut ram[r])
}

/// The `len` bytes of `ram` at `addr`.
pub fn slice(ram: &[u8], addr: u64, len: usize) -> Result<&[u8], OutOfRam> {
    let r = range(ram.len(), addr, len)?;
    Ok(&ram[r])
}

/// Copies `data` to guest-physical `addr`.
pub fn write(ram: &mut [u8], addr: u64, data: &[u8]) -> Result<(), OutOfRam> {
    slice_mut(ram, addr, data.len())?.copy_from_slice(data);
    Ok(())
}

/// Zeroes `len` bytes at `addr`.
pub fn zero(ram: &mut [u8], addr: u64, len: u64) -> Result<(), OutOfRam> {
    let n = usize::try_from(len).map_err(|_| OutOfRam { addr, len })?;
    slice_mut(ram, addr, n)?.fill(0);
    Ok(())
}

/// Little-endian integer fields of a byte image (a kernel file, a table
/// under construction): `None` when the field does not lie inside.
pub(crate) trait Le {
    fn field<const N: usize>(&self, off: usize) -> Option<[u8; N]>;
    fn u8_at(&self, off: usize) -> Option<u8> {
        self.field::<1>(off).map(|b| b[0])
    }
    fn u16_at(&self, off: usize) -> Option<u16> {
        self.field(off).map(u16::from_le_bytes)
    }
    fn u32_at(&self, off: usize) -> Option<u32> {
        self.field(off).map(u32::from_le_bytes)
    }
    fn u64_at(&self, off: usize) -> Option<u64> {
        self.field(off).map(u64::from_le_bytes)
    }
}

impl Le for [u8] {
    fn field<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        self.get(off..off.checked_add(N)?)?.try_into().ok()
    }
}

/// Stores little-endian fields into a buffer the caller sized; the offsets
/// are the caller's constants, so a miss is a bug in this crate and is
/// ignored rather than allowed to panic.
pub(crate) trait PutLe {
    fn put(&mut self, off: usize, bytes: &[u8]);
    fn put_u8(&mut self, off: usize, v: u8) {
        self.put(off, &[v]);
    }
    fn put_u16(&mut self, off: usize, v: u16) {
        self.put(off, &v.to_le_bytes());
    }
    fn put_u32(&mut self, off: usize, v: u32) {
        self.put(off, &v.to_le_bytes());
    }
    fn put_u64(&mut self, off: usize, v: u64) {
        self.put(off, &v.to_le_bytes());
    }
}

impl PutLe for [u8] {
    fn put(&mut self, off: usize, bytes: &[u8]) {
        debug_assert!(
            off + bytes.len() <= self.len(),
            "field at {off:#x} outside buffer"
        );
        if let Some(dst) = off
            .checked_add(bytes.len())
            .and_then(|end| self.get_mut(off..end))
        {
            dst.copy_from_slice(bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_stay_inside_ram() {
        let mut ram = [0u8; 16];
        assert_eq!(write(&mut ram, 12, &[1, 2, 3, 4]), Ok(()));
        assert_eq!(ram[12..], [1, 2, 3, 4]);
        assert_eq!(
            write(&mut ram, 13, &[1, 2, 3, 4]),
            Err(OutOfRam { addr: 13, len: 4 })
        );
        assert!(write(&mut ram, u64::MAX, &[1]).is_err());
        assert!(zero(&mut ram, 8, u64::MAX).is_err());
        assert!(slice(&ram, 16, 0).is_ok());
        assert!(slice(&ram, 17, 0).is_err());
    }

    #[test]
    fn le_fields_read_inside_only() {
        let b = [1u8, 2, 3, 4, 5];
        assert_eq!(b.u32_at(1), Some(0x0504_0302));
        assert_eq!(b.u32_at(2), None);
        assert_eq!(b.u64_at(usize::MAX), None);
    }
}
