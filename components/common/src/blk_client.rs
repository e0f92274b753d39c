//! A client of the block service (protocol: [`crate::blk`]): one request
//! at a time, answered before the next goes out. Used by the `blktest`
//! component and by the VMM, whose guest's virtio disk it backs.
//!
//! The client's region is shared with the service only; the service's
//! semaphore and the client's answer semaphore are capabilities the
//! manifest gives. An answer that does not come within the timeout is an
//! error; an answer that comes later (to a request already given up) is
//! skipped when it arrives, so the rings stay in step. A service that
//! crashes is restarted and serves what waits in the ring (see
//! [`crate::blk`]): to the client that is a slower answer.

use core::sync::atomic::{fence, Ordering};

use moat_user::mmio::Window;
use moat_user::{rdtsc, sys, Sel};

use crate::blk::{self, op, status, Request, Response};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// No answer within the timeout (or the semaphore failed).
    NoAnswer,
    /// The service answered with this status.
    Status(u32),
    /// A transfer whose buffer is not whole sectors, or a region too
    /// small for the rings and a sector of data.
    BadLength,
}

pub struct Client {
    region: Window,
    service: Sel,
    answers: Sel,
    head: u32,
    tail: u32,
    next_id: u64,
    /// TSC ticks to wait for an answer.
    timeout: u64,
}

impl Client {
    /// A client of the service on `region`, upping `service` for each
    /// request and waiting on `answers`; it resumes the rings where they
    /// stand, and numbers its requests from the TSC (a restarted client
    /// neither reuses old slots nor takes an old answer for its own).
    pub fn new(region: Window, service: Sel, answers: Sel, timeout: u64) -> Result<Self, Error> {
        if region.len() < blk::DATA + blk::SECTOR {
            return Err(Error::BadLength);
        }
        Ok(Self {
            region,
            service,
            answers,
            head: region.read::<u32>(blk::REQ_HEAD as u64),
            tail: region.read::<u32>(blk::RESP_TAIL as u64),
            next_id: rdtsc(),
            timeout,
        })
    }

    pub fn region(&self) -> &Window {
        &self.region
    }

    /// How many times the service has started on this region (its
    /// `service_starts`): it moves when a restarted service takes over.
    pub fn service_starts(&self) -> u32 {
        self.region.read::<u32>(blk::SERVICE_STARTS as u64)
    }

    /// Sends one request and waits for its answer, whatever its status.
    pub fn request(
        &mut self,
        op: u32,
        sector: u64,
        count: u32,
        buffer: u64,
    ) -> Result<Response, Error> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let request = Request {
            id,
            op,
            count,
            sector,
            buffer,
        };
        let at = blk::slot(blk::REQUESTS, blk::REQUEST_SIZE, self.head) as u64;
        self.region.write_bytes(at, &request.encode());
        fence(Ordering::SeqCst);
        self.head = self.head.wrapping_add(1);
        self.region.write::<u32>(blk::REQ_HEAD as u64, self.head);
        let _ = sys::sm_up(self.service);
        let deadline = rdtsc().saturating_add(self.timeout);
        loop {
            fence(Ordering::SeqCst);
            if self.region.read::<u32>(blk::RESP_HEAD as u64) == self.tail {
                if sys::sm_down(self.answers, deadline, false).is_err() {
                    return Err(Error::NoAnswer);
                }
                continue;
            }
            let mut bytes = [0; blk::RESPONSE_SIZE];
            let at = blk::slot(blk::RESPONSES, blk::RESPONSE_SIZE, self.tail) as u64;
            self.region.read_bytes(at, &mut bytes);
            self.tail = self.tail.wrapping_add(1);
            self.region.write::<u32>(blk::RESP_TAIL as u64, self.tail);
            let response = Response::decode(&bytes);
            // Anything else answers a request given up on earlier (and a
            // service that keeps sending those is no answer either).
            if response.id == id {
                return Ok(response);
            }
            if rdtsc() > deadline {
                return Err(Error::NoAnswer);
            }
        }
    }

    /// [`request`](Self::request), with any status but `OK` an error.
    pub fn ok(&mut self, op: u32, sector: u64, count: u32, buffer: u64) -> Result<Response, Error> {
        let response = self.request(op, sector, count, buffer)?;
        match response.status {
            status::OK => Ok(response),
            other => Err(Error::Status(other)),
        }
    }

    /// The disk's size in sectors.
    pub fn sectors(&mut self) -> Result<u64, Error> {
        Ok(u64::from(self.ok(op::INFO, 0, 0, 0)?.value))
    }

    /// Reads whole sectors from `sector` on into `buf`, through the
    /// region's data area.
    pub fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), Error> {
        let chunk = self.chunk_len(buf.len())?;
        for (i, part) in buf.chunks_mut(chunk).enumerate() {
            let first = sector.wrapping_add((i * chunk) as u64 / blk::SECTOR);
            self.ok(op::READ, first, sectors_in(part.len()), blk::DATA)?;
            self.region.read_bytes(blk::DATA, part);
        }
        Ok(())
    }

    /// Writes whole sectors from `sector` on, through the region's data
    /// area.
    pub fn write(&mut self, sector: u64, data: &[u8]) -> Result<(), Error> {
        let chunk = self.chunk_len(data.len())?;
        for (i, part) in data.chunks(chunk).enumerate() {
            let first = sector.wrapping_add((i * chunk) as u64 / blk::SECTOR);
            self.region.write_bytes(blk::DATA, part);
            self.ok(op::WRITE, first, sectors_in(part.len()), blk::DATA)?;
        }
        Ok(())
    }

    /// Everything written is on stable storage when this returns `Ok`.
    pub fn flush(&mut self) -> Result<(), Error> {
        self.ok(op::FLUSH, 0, 0, 0).map(|_| ())
    }

    /// The bytes one request moves for a transfer of `len`: whole sectors,
    /// at most [`blk::MAX_SECTORS`], and what the data area holds.
    fn chunk_len(&self, len: usize) -> Result<usize, Error> {
        let data_area = self.region.len().saturating_sub(blk::DATA);
        let chunk = (u64::from(blk::MAX_SECTORS) * blk::SECTOR).min(data_area);
        let chunk = chunk - chunk % blk::SECTOR;
        if chunk == 0 || !(len as u64).is_multiple_of(blk::SECTOR) {
            return Err(Error::BadLength);
        }
        Ok(chunk as usize)
    }
}

fn sectors_in(len: usize) -> u32 {
    (len as u64 / blk::SECTOR) as u32
}
