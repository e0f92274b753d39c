//! virtio block device: IN, OUT, FLUSH and GET_ID requests over a
//! [`BlockBackend`] of 512-byte sectors (its storage; a failing back end
//! gives the guest `VIRTIO_BLK_S_IOERR`); [`MemDisk`] keeps the disk in
//! RAM, the VMM's other back end is a client of the block service.

use alloc::vec::Vec;

use super::queue::{Chain, QueueError, QUEUE_SIZE_MAX};
use super::{read_config_image, DeviceIo, VirtioDevice, DEVICE_TYPE_BLOCK};
use crate::GuestMemory;

pub const SECTOR_SIZE: u64 = 512;
pub const BLK_F_SEG_MAX: u64 = 1 << 2;
pub const BLK_F_RO: u64 = 1 << 5;
pub const BLK_F_FLUSH: u64 = 1 << 9;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

const REQUEST_QUEUE: u16 = 0;
const HEADER_LEN: usize = 16;
pub const ID_LEN: usize = 20;
/// A request's header and status take two descriptors of a chain.
const SEG_MAX: u32 = QUEUE_SIZE_MAX as u32 - 2;
/// capacity, size_max, seg_max, geometry, blk_size, topology, writeback,
/// num_queues: the fields up to those a driver reads only with features
/// this device does not offer.
const CONFIG_LEN: usize = 36;
/// Most bytes handed to the back end at once (a guest's 1 MiB request is
/// one call); the buffer grows to what requests need, up to this.
const CHUNK: usize = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoError;

pub trait BlockBackend {
    /// Capacity in sectors.
    fn sectors(&self) -> u64;
    /// `buf.len()` is a multiple of the sector size; the device checked
    /// the range against [`sectors`](Self::sectors).
    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), IoError>;
    fn write(&mut self, sector: u64, data: &[u8]) -> Result<(), IoError>;
    fn flush(&mut self) -> Result<(), IoError> {
        Ok(())
    }
    fn read_only(&self) -> bool {
        false
    }
}

/// A back end chosen at run time (the VMM's: the block service or RAM).
impl<B: BlockBackend + ?Sized> BlockBackend for alloc::boxed::Box<B> {
    fn sectors(&self) -> u64 {
        (**self).sectors()
    }
    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), IoError> {
        (**self).read(sector, buf)
    }
    fn write(&mut self, sector: u64, data: &[u8]) -> Result<(), IoError> {
        (**self).write(sector, data)
    }
    fn flush(&mut self) -> Result<(), IoError> {
        (**self).flush()
    }
    fn read_only(&self) -> bool {
        (**self).read_only()
    }
}

/// A disk image held in memory; a trailing partial sector is not part of
/// the disk.
pub struct MemDisk {
    data: Vec<u8>,
}

impl MemDisk {
    pub fn new(data: Vec<u8>) -> Self {
        Self { data }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.data
    }

    pub fn into_inner(self) -> Vec<u8> {
        self.data
    }

    fn range(&self, sector: u64, len: usize) -> Result<core::ops::Range<usize>, IoError> {
        let start = sector
            .checked_mul(SECTOR_SIZE)
            .and_then(|start| usize::try_from(start).ok())
            .ok_or(IoError)?;
        let end = start.checked_add(len).ok_or(IoError)?;
        let disk_end = self.data.len() - self.data.len() % SECTOR_SIZE as usize;
        if end > disk_end {
            return Err(IoError);
        }
        Ok(start..end)
    }
}

impl BlockBackend for MemDisk {
    fn sectors(&self) -> u64 {
        self.data.len() as u64 / SECTOR_SIZE
    }

    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), IoError> {
        let range = self.range(sector, buf.len())?;
        buf.copy_from_slice(&self.data[range]);
        Ok(())
    }

    fn write(&mut self, sector: u64, data: &[u8]) -> Result<(), IoError> {
        let range = self.range(sector, data.len())?;
        self.data[range].copy_from_slice(data);
        Ok(())
    }
}

pub struct Block<B> {
    backend: B,
    id: [u8; ID_LEN],
    scratch: Vec<u8>,
}

impl<B: BlockBackend> Block<B> {
    /// `id` is what GET_ID returns (the disk's serial), cut to 20 bytes.
    pub fn new(backend: B, id: &[u8]) -> Self {
        let mut padded = [0u8; ID_LEN];
        let len = id.len().min(ID_LEN);
        padded[..len].copy_from_slice(&id[..len]);
        Self {
            backend,
            id: padded,
            scratch: Vec::new(),
        }
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    fn grow_scratch(&mut self, len: usize) {
        if self.scratch.len() < len {
            self.scratch.resize(len, 0);
        }
    }

    /// The sector range of a transfer of `len` bytes, if it is whole
    /// sectors inside the disk.
    fn check_range(&self, sector: u64, len: u64) -> bool {
        len.is_multiple_of(SECTOR_SIZE)
            && sector
                .checked_add(len / SECTOR_SIZE)
                .is_some_and(|end| end <= self.backend.sectors())
    }

    /// Serve one request; returns its status and the data bytes written to
    /// the guest (the status byte not counted).
    fn serve(
        &mut self,
        mem: &dyn GuestMemory,
        chain: &Chain,
        data_in: u64,
    ) -> Result<(u8, u64), QueueError> {
        let mut reader = chain.reader();
        let mut header = [0u8; HEADER_LEN];
        if reader.read(mem, &mut header)? < HEADER_LEN {
            return Ok((S_IOERR, 0));
        }
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let mut sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
        match kind {
            T_IN => {
                if !self.check_range(sector, data_in) {
                    return Ok((S_IOERR, 0));
                }
                let mut writer = chain.writer(data_in);
                while writer.remaining() > 0 {
                    let len = writer.remaining().min(CHUNK as u64) as usize;
                    self.grow_scratch(len);
                    if self.backend.read(sector, &mut self.scratch[..len]).is_err() {
                        return Ok((S_IOERR, writer.done()));
                    }
                    writer.write(mem, &self.scratch[..len])?;
                    sector += len as u64 / SECTOR_SIZE;
                }
                Ok((S_OK, data_in))
            }
            T_OUT => {
                if self.backend.read_only() || !self.check_range(sector, reader.remaining()) {
                    return Ok((S_IOERR, 0));
                }
                while reader.remaining() > 0 {
                    let len = reader.remaining().min(CHUNK as u64) as usize;
                    self.grow_scratch(len);
                    reader.read(mem, &mut self.scratch[..len])?;
                    if self.backend.write(sector, &self.scratch[..len]).is_err() {
                        return Ok((S_IOERR, 0));
                    }
                    sector += len as u64 / SECTOR_SIZE;
                }
                Ok((S_OK, 0))
            }
            T_FLUSH => match self.backend.flush() {
                Ok(()) => Ok((S_OK, 0)),
                Err(IoError) => Ok((S_IOERR, 0)),
            },
            T_GET_ID => {
                let written = chain.writer(data_in).write(mem, &self.id)?;
                Ok((S_OK, written as u64))
            }
            _ => Ok((S_UNSUPP, 0)),
        }
    }
}

impl<B: BlockBackend> VirtioDevice for Block<B> {
    fn device_type(&self) -> u16 {
        DEVICE_TYPE_BLOCK
    }

    fn queue_count(&self) -> u16 {
        1
    }

    fn features(&self) -> u64 {
        let read_only = if self.backend.read_only() {
            BLK_F_RO
        } else {
            0
        };
        BLK_F_SEG_MAX | BLK_F_FLUSH | read_only
    }

    fn config_len(&self) -> usize {
        CONFIG_LEN
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut image = [0u8; CONFIG_LEN];
        image[0..8].copy_from_slice(&self.backend.sectors().to_le_bytes());
        image[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        read_config_image(&image, offset, data);
    }

    fn reset(&mut self) {}

    fn process(&mut self, io: &mut DeviceIo<'_>) -> Result<(), QueueError> {
        let mem = io.mem();
        while let Some(chain) = io.pop(REQUEST_QUEUE)? {
            // The status byte is the last device-writable byte; a chain
            // without one cannot be answered.
            let Some(data_in) = chain.writable_len().checked_sub(1) else {
                io.push(REQUEST_QUEUE, &chain, 0)?;
                continue;
            };
            let (status, written) = self.serve(mem, &chain, data_in)?;
            let mut status_writer = chain.writer(u64::MAX);
            status_writer.skip(data_in);
            status_writer.write(mem, &[status])?;
            io.push(
                REQUEST_QUEUE,
                &chain,
                u32::try_from(written + 1).unwrap_or(u32::MAX),
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::mock::{Driver, Machine};
    use crate::virtio::pci::{common, STATUS_NEEDS_RESET};
    use crate::virtio::{VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1};
    use alloc::vec;

    const FEATURES: u64 =
        VIRTIO_F_VERSION_1 | VIRTIO_F_RING_INDIRECT_DESC | BLK_F_FLUSH | BLK_F_SEG_MAX;
    const SECTORS: u64 = 64;

    fn disk() -> MemDisk {
        MemDisk::new(
            (0..SECTORS * SECTOR_SIZE)
                .map(|i| (i / SECTOR_SIZE) as u8)
                .collect(),
        )
    }

    fn header(kind: u32, sector: u64) -> [u8; HEADER_LEN] {
        let mut header = [0u8; HEADER_LEN];
        header[0..4].copy_from_slice(&kind.to_le_bytes());
        header[8..16].copy_from_slice(&sector.to_le_bytes());
        header
    }

    /// One request the way Linux builds it: header, data segments, status,
    /// behind an indirect descriptor. Returns (status, used length, data
    /// read back).
    fn request(
        driver: &mut Driver,
        kind: u32,
        sector: u64,
        out: &[&[u8]],
        in_lens: &[u32],
    ) -> (u8, u32, Vec<u8>) {
        let m = driver.m;
        let mut chain = vec![(
            m.alloc_data(&header(kind, sector)),
            HEADER_LEN as u32,
            false,
        )];
        for data in out {
            chain.push((m.alloc_data(data), data.len() as u32, false));
        }
        let ins: Vec<u64> = in_lens
            .iter()
            .map(|&len| m.alloc(u64::from(len), 16))
            .collect();
        for (&addr, &len) in ins.iter().zip(in_lens) {
            chain.push((addr, len, true));
        }
        let status = m.alloc_data(&[0xee]);
        chain.push((status, 1, true));
        let table = m.alloc(16 * chain.len() as u64, 16);
        let head = driver.queues[0].add_indirect(&m.mem, table, &chain);
        driver.kick(0);
        let (id, len) = driver.used(0).expect("request answered");
        assert_eq!(id, u32::from(head));
        let data = ins
            .iter()
            .zip(in_lens)
            .flat_map(|(&addr, &len)| m.mem.bytes(addr, len as usize))
            .collect();
        (m.mem.bytes(status, 1)[0], len, data)
    }

    fn machine<B: BlockBackend + 'static>(
        backend: B,
    ) -> (
        Machine,
        crate::Shared<crate::virtio::pci::VirtioPci<Block<B>>>,
    ) {
        let m = Machine::new();
        let device = m.plug(Block::new(backend, b"moat-disk-0"));
        (m, device)
    }

    #[test]
    fn configuration_and_features() {
        let (m, _) = machine(disk());
        let driver = Driver::probe(&m, DEVICE_TYPE_BLOCK);
        assert_eq!(
            driver.device_features() & !(VIRTIO_F_VERSION_1 | VIRTIO_F_RING_INDIRECT_DESC),
            BLK_F_SEG_MAX | BLK_F_FLUSH
        );
        assert_eq!(driver.config_read(0, 8), SECTORS);
        assert_eq!(driver.config_read(0, 4), SECTORS, "capacity read in halves");
        assert_eq!(driver.config_read(4, 4), 0);
        assert_eq!(driver.config_read(12, 4), 254);
        assert_eq!(m.cfg_read(driver.slot, 0x0a, 2), 0x0100);
    }

    #[test]
    fn writes_then_reads_back_across_segments() {
        let (m, device) = machine(disk());
        let mut driver = Driver::probe(&m, DEVICE_TYPE_BLOCK);
        driver.bring_up(FEATURES, 1);
        let data: Vec<u8> = (0..3 * SECTOR_SIZE as usize)
            .map(|i| (i * 7) as u8)
            .collect();
        // Segments not aligned to sectors: only the total must be.
        let (status, len, _) = request(
            &mut driver,
            T_OUT,
            10,
            &[&data[..100], &data[100..1000], &data[1000..]],
            &[],
        );
        assert_eq!((status, len), (S_OK, 1));
        let (status, len, read) = request(&mut driver, T_IN, 9, &[], &[512, 700, 836]);
        assert_eq!((status, len), (S_OK, 2049));
        assert!(read[..512] == [9u8; 512]);
        assert!(read[512..] == data[..]);
        assert!(device.borrow().device().backend().as_bytes()[10 * 512..13 * 512] == data[..]);
        assert_eq!(m.msi.count(1), 2);
    }

    #[test]
    fn out_of_range_and_misshapen_requests_fail_with_ioerr() {
        let (m, device) = machine(disk());
        let mut driver = Driver::probe(&m, DEVICE_TYPE_BLOCK);
        driver.bring_up(FEATURES, 1);
        let sector = [0x55u8; 512];
        for (kind, first) in [
            (T_IN, SECTORS),
            (T_IN, SECTORS - 1),
            (T_OUT, SECTORS - 1),
            (T_IN, u64::MAX),
        ] {
            let (out, ins): (&[&[u8]], &[u32]) = if kind == T_IN {
                (&[], &[1024])
            } else {
                (&[&sector, &sector], &[])
            };
            let (status, len, _) = request(&mut driver, kind, first, out, ins);
            assert_eq!(status, S_IOERR, "{kind} at {first}");
            assert_eq!(len, 1);
        }
        assert_eq!(
            request(&mut driver, T_IN, 0, &[], &[100]).0,
            S_IOERR,
            "not whole sectors"
        );
        assert_eq!(
            request(&mut driver, T_OUT, 0, &[&sector[..300]], &[]).0,
            S_IOERR
        );
        assert_eq!(request(&mut driver, 99, 0, &[], &[]).0, S_UNSUPP);
        assert!(
            device.borrow().device().backend().as_bytes()[(SECTORS as usize - 1) * 512..]
                .iter()
                .all(|&b| b == 63)
        );

        // A header cut short, and a chain with nowhere to put a status.
        let m = driver.m;
        let short = m.alloc_data(&header(T_IN, 0)[..8]);
        let status = m.alloc_data(&[0xee]);
        let head = driver.add(0, &[(short, 8, false), (status, 1, true)]);
        driver.kick(0);
        assert_eq!(driver.used(0), Some((u32::from(head), 1)));
        assert_eq!(m.mem.bytes(status, 1), [S_IOERR]);
        let lone = m.alloc_data(&header(T_FLUSH, 0));
        let head = driver.add(0, &[(lone, 16, false)]);
        driver.kick(0);
        assert_eq!(driver.used(0), Some((u32::from(head), 0)));
        assert_eq!(driver.status() & STATUS_NEEDS_RESET, 0);
    }

    #[test]
    fn flush_and_get_id() {
        let (m, _) = machine(disk());
        let mut driver = Driver::probe(&m, DEVICE_TYPE_BLOCK);
        driver.bring_up(FEATURES, 1);
        assert_eq!(
            request(&mut driver, T_FLUSH, 0, &[], &[]),
            (S_OK, 1, vec![])
        );
        let (status, len, id) = request(&mut driver, T_GET_ID, 0, &[], &[ID_LEN as u32]);
        assert_eq!((status, len), (S_OK, ID_LEN as u32 + 1));
        assert_eq!(&id[..], b"moat-disk-0\0\0\0\0\0\0\0\0\0");
        let (status, len, id) = request(&mut driver, T_GET_ID, 0, &[], &[4]);
        assert_eq!((status, len, &id[..]), (S_OK, 5, &b"moat"[..]));
    }

    struct Faulty {
        read_only: bool,
        flushes: u32,
    }

    impl BlockBackend for Faulty {
        fn sectors(&self) -> u64 {
            8
        }
        fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), IoError> {
            buf.fill(sector as u8);
            if sector + buf.len() as u64 / SECTOR_SIZE > 4 {
                Err(IoError)
            } else {
                Ok(())
            }
        }
        fn write(&mut self, _: u64, _: &[u8]) -> Result<(), IoError> {
            Err(IoError)
        }
        fn flush(&mut self) -> Result<(), IoError> {
            self.flushes += 1;
            Err(IoError)
        }
        fn read_only(&self) -> bool {
            self.read_only
        }
    }

    #[test]
    fn back_end_errors_and_read_only_disks() {
        let (m, device) = machine(Faulty {
            read_only: true,
            flushes: 0,
        });
        let mut driver = Driver::probe(&m, DEVICE_TYPE_BLOCK);
        assert_ne!(driver.device_features() & BLK_F_RO, 0);
        driver.bring_up(FEATURES | BLK_F_RO, 1);
        assert_eq!(request(&mut driver, T_OUT, 0, &[&[0; 512]], &[]).0, S_IOERR);
        assert_eq!(request(&mut driver, T_FLUSH, 0, &[], &[]).0, S_IOERR);
        assert_eq!(device.borrow().device().backend().flushes, 1);
        assert_eq!(request(&mut driver, T_IN, 3, &[], &[512]).0, S_OK);
        // A read crossing into the failing sectors fails as a whole.
        assert_eq!(request(&mut driver, T_IN, 0, &[], &[4096]).0, S_IOERR);
        assert_eq!(request(&mut driver, T_IN, 0, &[], &[2048]).0, S_OK);
    }

    #[test]
    fn the_disk_survives_a_device_reset() {
        let (m, device) = machine(disk());
        let mut driver = Driver::probe(&m, DEVICE_TYPE_BLOCK);
        driver.bring_up(FEATURES, 1);
        assert_eq!(request(&mut driver, T_OUT, 5, &[&[0xab; 512]], &[]).0, S_OK);
        driver.set_status(0);
        driver.write(common::QUEUE_SELECT, 2, 0);
        assert_eq!(driver.read(common::QUEUE_ENABLE, 2), 0);
        driver.bring_up(FEATURES, 1);
        assert_eq!(
            request(&mut driver, T_IN, 5, &[], &[512]),
            (S_OK, 513, vec![0xab; 512])
        );
        let image = device.borrow().device().backend().as_bytes()[5 * 512..6 * 512].to_vec();
        assert_eq!(image, vec![0xab; 512]);
    }

    #[test]
    fn mem_disk_bounds() {
        let mut disk = MemDisk::new(vec![7; 1000]);
        assert_eq!(
            disk.sectors(),
            1,
            "the partial sector is not part of the disk"
        );
        let mut buf = [0u8; 512];
        assert_eq!(disk.read(0, &mut buf), Ok(()));
        assert_eq!(disk.read(1, &mut buf), Err(IoError));
        assert_eq!(disk.write(u64::MAX, &buf), Err(IoError));
        assert_eq!(disk.read(0, &mut [0u8; 1024]), Err(IoError));
        assert_eq!(disk.into_inner().len(), 1000);
    }
}
