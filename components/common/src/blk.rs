//! The block service's shared-memory protocol (the `blk` component and its
//! clients), and the service's checks of what a client asks.
//!
//! Each client has a region of its own, shared with the service only:
//!
//! | offset | what |
//! | --- | --- |
//! | 0x000 | `req_head` (u32, client), `req_tail` (u32, service) |
//! | 0x008 | `resp_head` (u32, service), `resp_tail` (u32, client) |
//! | 0x010 | `service_starts` (u32, service): bumped by each start of the service |
//! | 0x040 | request ring: [`RING`] × 32-byte [`Request`] |
//! | 0x240 | response ring: [`RING`] × 16-byte [`Response`] |
//! | 0x1000 | data: the buffers requests name, by offset in the region |
//!
//! One request moves up to [`MAX_SECTORS`] (1 MiB) between the disk and a
//! buffer anywhere in the data area, as long as it fits there: a region's
//! size bounds its client's transfers (the VMM's guest disk gets 1 MiB +
//! 4 KiB, the test clients 64 KiB). The service moves it through its own
//! DMA pages, in as many device requests as they need.
//!
//! Heads and tails count up for ever (wrapping u32); entry `i` lives at
//! `i % RING`. A client writes a request, then bumps `req_head`, then ups
//! the service's semaphore; the service copies each request out before it
//! checks it (the client may change the ring at any time), answers every
//! request with a response carrying its `id`, bumps `resp_head` and ups
//! the client's semaphore. Sectors are 512 bytes and counted from the
//! start of the client's own disk (its part of the device, per manifest);
//! a request outside it, with a buffer outside the region's data area, or
//! malformed gets an error status and touches nothing.
//!
//! The service moves `req_tail` past a request only once it has answered
//! it, so a service that crashes and is restarted (the region outlives
//! it) finds the request it was serving still in the ring and serves it
//! then: its client's wait only grows longer (and a read, write or flush
//! may reach the device twice, which changes nothing).

pub const SECTOR: u64 = 512;
pub const RING: u32 = 16;
pub const REQ_HEAD: usize = 0x00;
pub const REQ_TAIL: usize = 0x04;
pub const RESP_HEAD: usize = 0x08;
pub const RESP_TAIL: usize = 0x0c;
pub const SERVICE_STARTS: usize = 0x10;
pub const REQUESTS: usize = 0x40;
pub const REQUEST_SIZE: usize = 32;
pub const RESPONSES: usize = REQUESTS + RING as usize * REQUEST_SIZE;
pub const RESPONSE_SIZE: usize = 16;
pub const DATA: u64 = 0x1000;
/// Most sectors one request moves (1 MiB); the client's buffer must also
/// lie in its region's data area.
pub const MAX_SECTORS: u32 = 2048;

/// Operations.
pub mod op {
    pub const READ: u32 = 1;
    pub const WRITE: u32 = 2;
    /// Everything written before is on stable storage when it completes.
    pub const FLUSH: u32 = 3;
    /// Answers with the disk's size in sectors in `Response::value`.
    pub const INFO: u32 = 4;
}

/// Response statuses.
pub mod status {
    pub const OK: u32 = 0;
    /// The device failed the request.
    pub const IO_ERROR: u32 = 1;
    pub const UNSUPPORTED: u32 = 2;
    /// Sectors beyond the client's disk.
    pub const OUT_OF_RANGE: u32 = 3;
    /// A buffer outside the region's data area.
    pub const BAD_BUFFER: u32 = 4;
    /// A count of 0 or above [`super::MAX_SECTORS`].
    pub const BAD_COUNT: u32 = 5;
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Request {
    pub id: u64,
    pub op: u32,
    pub count: u32,
    pub sector: u64,
    /// Byte offset of the buffer in the region.
    pub buffer: u64,
}

impl Request {
    pub fn encode(&self) -> [u8; REQUEST_SIZE] {
        let mut b = [0; REQUEST_SIZE];
        b[0..8].copy_from_slice(&self.id.to_le_bytes());
        b[8..12].copy_from_slice(&self.op.to_le_bytes());
        b[12..16].copy_from_slice(&self.count.to_le_bytes());
        b[16..24].copy_from_slice(&self.sector.to_le_bytes());
        b[24..32].copy_from_slice(&self.buffer.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; REQUEST_SIZE]) -> Self {
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap_or([0; 4]));
        Self {
            id: u64_at(0),
            op: u32_at(8),
            count: u32_at(12),
            sector: u64_at(16),
            buffer: u64_at(24),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Response {
    pub id: u64,
    pub status: u32,
    /// `INFO`: the disk's sectors (low 32 bits).
    pub value: u32,
}

impl Response {
    pub fn encode(&self) -> [u8; RESPONSE_SIZE] {
        let mut b = [0; RESPONSE_SIZE];
        b[0..8].copy_from_slice(&self.id.to_le_bytes());
        b[8..12].copy_from_slice(&self.status.to_le_bytes());
        b[12..16].copy_from_slice(&self.value.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; RESPONSE_SIZE]) -> Self {
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap_or([0; 4]));
        Self {
            id: u64::from_le_bytes(b[0..8].try_into().unwrap_or([0; 8])),
            status: u32_at(8),
            value: u32_at(12),
        }
    }
}

/// A client's disk: `sectors` of the device from `start` on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Disk {
    pub start: u64,
    pub sectors: u64,
}

/// What the service does for a checked request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Device sector, sector count, byte offset of the buffer in the region.
    Read {
        sector: u64,
        count: u32,
        buffer: u64,
    },
    Write {
        sector: u64,
        count: u32,
        buffer: u64,
    },
    Flush,
    Info,
}

/// Checks a request against the client's disk and region (`region` bytes):
/// the device sectors and buffer it may touch, or the error status.
pub fn check(request: &Request, disk: Disk, region: u64) -> Result<Action, u32> {
    match request.op {
        op::FLUSH => return Ok(Action::Flush),
        op::INFO => return Ok(Action::Info),
        op::READ | op::WRITE => {}
        _ => return Err(status::UNSUPPORTED),
    }
    if request.count == 0 || request.count > MAX_SECTORS {
        return Err(status::BAD_COUNT);
    }
    let count = u64::from(request.count);
    let end = request
        .sector
        .checked_add(count)
        .ok_or(status::OUT_OF_RANGE)?;
    if end > disk.sectors {
        return Err(status::OUT_OF_RANGE);
    }
    let bytes = count * SECTOR;
    let buffer_end = request
        .buffer
        .checked_add(bytes)
        .ok_or(status::BAD_BUFFER)?;
    if request.buffer < DATA || buffer_end > region {
        return Err(status::BAD_BUFFER);
    }
    let sector = disk.start + request.sector;
    Ok(if request.op == op::READ {
        Action::Read {
            sector,
            count: request.count,
            buffer: request.buffer,
        }
    } else {
        Action::Write {
            sector,
            count: request.count,
            buffer: request.buffer,
        }
    })
}

/// Requests waiting in a ring with these indices, or `None` if the
/// producer's index is further ahead than a ring holds (a broken client).
pub fn pending(head: u32, tail: u32) -> Option<u32> {
    let n = head.wrapping_sub(tail);
    (n <= RING).then_some(n)
}

/// Where entry `index` of a ring at `base` with `size`-byte entries lies.
pub fn slot(base: usize, size: usize, index: u32) -> usize {
    base + (index % RING) as usize * size
}

/// Size of the service's DMA pages.
pub const PAGE: u64 = 4096;

/// The device segments of a transfer of `bytes` from the start of a
/// bounce buffer whose pages lie at the physical addresses `pages`, in
/// order: each page's part, physically adjacent pages merged into one
/// segment; `each` gets every segment's address and length. Never more
/// than the pages hold (the rest of `bytes` is left out), never a segment
/// of 0 bytes.
pub fn bounce_segments(pages: &[u64], bytes: u64, mut each: impl FnMut(u64, u64)) {
    let mut left = bytes.min(pages.len() as u64 * PAGE);
    let mut page = 0;
    while left > 0 {
        let start = pages[page];
        let mut len = left.min(PAGE);
        page += 1;
        while len < left && page < pages.len() && start.checked_add(len) == Some(pages[page]) {
            len += (left - len).min(PAGE);
            page += 1;
        }
        each(start, len);
        left -= len;
    }
}

/// A disk description from the service's arguments: `START,SECTORS`.
pub fn parse_disk(text: &str) -> Option<Disk> {
    let (start, sectors) = text.split_once(',')?;
    let disk = Disk {
        start: crate::args::parse_number(start)?,
        sectors: crate::args::parse_number(sectors)?,
    };
    disk.start.checked_add(disk.sectors)?;
    Some(disk)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DISK: Disk = Disk {
        start: 2048,
        sectors: 2048,
    };
    const REGION: u64 = 0x10000;

    fn req(op: u32, sector: u64, count: u32, buffer: u64) -> Request {
        Request {
            id: 7,
            op,
            count,
            sector,
            buffer,
        }
    }

    #[test]
    fn requests_and_responses_round_trip() {
        let r = req(op::WRITE, 0x1234_5678_9abc, 8, 0x2000);
        assert_eq!(Request::decode(&r.encode()), r);
        let s = Response {
            id: u64::MAX,
            status: status::BAD_BUFFER,
            value: 99,
        };
        assert_eq!(Response::decode(&s.encode()), s);
        assert!(RESPONSES + RING as usize * RESPONSE_SIZE <= DATA as usize);
    }

    #[test]
    fn good_requests_land_in_the_clients_part_of_the_device() {
        assert_eq!(
            check(&req(op::READ, 0, 8, DATA), DISK, REGION),
            Ok(Action::Read {
                sector: 2048,
                count: 8,
                buffer: DATA
            })
        );
        assert_eq!(
            check(&req(op::WRITE, 2040, 8, REGION - 4096), DISK, REGION),
            Ok(Action::Write {
                sector: 4088,
                count: 8,
                buffer: REGION - 4096
            })
        );
        assert_eq!(
            check(&req(op::FLUSH, 0, 0, 0), DISK, REGION),
            Ok(Action::Flush)
        );
        assert_eq!(
            check(&req(op::INFO, 0, 0, 0), DISK, REGION),
            Ok(Action::Info)
        );
    }

    #[test]
    fn bad_requests_get_their_status() {
        let bad = |r: Request| check(&r, DISK, REGION).unwrap_err();
        assert_eq!(bad(req(0, 0, 1, DATA)), status::UNSUPPORTED);
        assert_eq!(bad(req(99, 0, 1, DATA)), status::UNSUPPORTED);
        assert_eq!(bad(req(op::READ, 0, 0, DATA)), status::BAD_COUNT);
        assert_eq!(
            bad(req(op::READ, 0, MAX_SECTORS + 1, DATA)),
            status::BAD_COUNT
        );
        // Past the end, straddling it, and wrapping around.
        assert_eq!(bad(req(op::READ, 2048, 1, DATA)), status::OUT_OF_RANGE);
        assert_eq!(bad(req(op::WRITE, 2047, 2, DATA)), status::OUT_OF_RANGE);
        assert_eq!(
            bad(req(op::READ, u64::MAX - 1, 8, DATA)),
            status::OUT_OF_RANGE
        );
        // Buffers over the rings, past the region, wrapping.
        assert_eq!(bad(req(op::READ, 0, 1, 0)), status::BAD_BUFFER);
        assert_eq!(bad(req(op::READ, 0, 1, DATA - 1)), status::BAD_BUFFER);
        assert_eq!(bad(req(op::READ, 0, 8, REGION - 4095)), status::BAD_BUFFER);
        assert_eq!(bad(req(op::READ, 0, 1, u64::MAX - 100)), status::BAD_BUFFER);
    }

    #[test]
    fn large_requests_fill_the_data_area_and_no_more() {
        // The whole data area of a 64 KiB region in one request.
        let whole = ((REGION - DATA) / SECTOR) as u32;
        assert_eq!(
            check(&req(op::WRITE, 100, whole, DATA), DISK, REGION),
            Ok(Action::Write {
                sector: 2148,
                count: whole,
                buffer: DATA
            })
        );
        let bad = |r: Request, region| check(&r, DISK, region).unwrap_err();
        assert_eq!(
            bad(req(op::READ, 0, whole + 1, DATA), REGION),
            status::BAD_BUFFER
        );
        assert_eq!(
            bad(req(op::READ, 0, whole, DATA + SECTOR), REGION),
            status::BAD_BUFFER
        );
        // The most a request moves, in a region big enough for it.
        let big = DATA + u64::from(MAX_SECTORS) * SECTOR;
        let disk = Disk {
            start: 0,
            sectors: 1 << 20,
        };
        assert_eq!(
            check(&req(op::READ, 7, MAX_SECTORS, DATA), disk, big),
            Ok(Action::Read {
                sector: 7,
                count: MAX_SECTORS,
                buffer: DATA
            })
        );
        assert_eq!(
            check(&req(op::READ, 0, MAX_SECTORS + 1, DATA), disk, 2 * big).unwrap_err(),
            status::BAD_COUNT
        );
        assert_eq!(
            check(&req(op::READ, 0, u32::MAX, DATA), disk, u64::MAX).unwrap_err(),
            status::BAD_COUNT
        );
        // Past the disk's end by one sector, with a buffer that fits.
        assert_eq!(
            check(
                &req(op::WRITE, (1 << 20) - 2047, MAX_SECTORS, DATA),
                disk,
                big
            )
            .unwrap_err(),
            status::OUT_OF_RANGE
        );
    }

    #[test]
    fn every_accepted_request_stays_inside_disk_and_region() {
        let mut rng = crate::rng::Xorshift::new(13);
        for _ in 0..100_000 {
            let pick = |rng: &mut crate::rng::Xorshift, near: u64| match rng.next_u64() % 4 {
                0 => rng.next_u64(),
                1 => near.wrapping_add(rng.next_u64() % 16).wrapping_sub(8),
                2 => rng.next_u64() % (near + 1),
                _ => u64::MAX - rng.next_u64() % 16,
            };
            let r = Request {
                id: 0,
                op: (rng.next_u64() % 6) as u32,
                count: match rng.next_u64() % 3 {
                    0 => (rng.next_u64() % 12) as u32,
                    1 => (rng.next_u64() % u64::from(MAX_SECTORS + 16)) as u32,
                    _ => rng.next_u64() as u32,
                },
                sector: pick(&mut rng, DISK.sectors),
                buffer: pick(&mut rng, REGION),
            };
            if let Ok(
                Action::Read {
                    sector,
                    count,
                    buffer,
                }
                | Action::Write {
                    sector,
                    count,
                    buffer,
                },
            ) = check(&r, DISK, REGION)
            {
                let count = u64::from(count);
                assert!(sector >= DISK.start && sector + count <= DISK.start + DISK.sectors);
                assert!(buffer >= DATA && buffer + count * SECTOR <= REGION);
            }
        }
    }

    fn segments(pages: &[u64], bytes: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        bounce_segments(pages, bytes, |address, len| out.push((address, len)));
        out
    }

    #[test]
    fn bounce_pages_become_merged_segments() {
        // Adjacent pages: one segment; a partial last page.
        let adjacent = [0x10000, 0x11000, 0x12000, 0x13000];
        assert_eq!(segments(&adjacent, 4 * PAGE), [(0x10000, 4 * PAGE)]);
        assert_eq!(
            segments(&adjacent, 2 * PAGE + 512),
            [(0x10000, 2 * PAGE + 512)]
        );
        assert_eq!(segments(&adjacent, 512), [(0x10000, 512)]);
        assert_eq!(segments(&adjacent, 0), []);
        // Scattered and reversed pages stay apart; runs merge.
        let scattered = [0x50000, 0x20000, 0x21000, 0x1f000, 0x30000];
        assert_eq!(
            segments(&scattered, 5 * PAGE),
            [
                (0x50000, PAGE),
                (0x20000, 2 * PAGE),
                (0x1f000, PAGE),
                (0x30000, PAGE)
            ]
        );
        assert_eq!(
            segments(&scattered, PAGE + 1024),
            [(0x50000, PAGE), (0x20000, 1024)]
        );
        // Never past the pages, whatever is asked; no wrap at the top.
        assert_eq!(segments(&adjacent, u64::MAX), [(0x10000, 4 * PAGE)]);
        let top = [u64::MAX - PAGE + 1, 0];
        assert_eq!(
            segments(&top, 2 * PAGE),
            [(u64::MAX - PAGE + 1, PAGE), (0, PAGE)]
        );
        assert_eq!(segments(&[], PAGE), []);
    }

    #[test]
    fn ring_indices() {
        assert_eq!(pending(5, 5), Some(0));
        assert_eq!(pending(3, u32::MAX - 2), Some(6));
        assert_eq!(pending(RING, 0), Some(RING));
        assert_eq!(pending(RING + 1, 0), None);
        assert_eq!(pending(0, 1), None);
        assert_eq!(slot(REQUESTS, REQUEST_SIZE, RING + 2), REQUESTS + 64);
    }

    #[test]
    fn disks_from_arguments() {
        assert_eq!(
            parse_disk("0x800,2048"),
            Some(Disk {
                start: 2048,
                sectors: 2048
            })
        );
        assert_eq!(parse_disk("1"), None);
        assert_eq!(parse_disk("18446744073709551615,2"), None);
    }
}
