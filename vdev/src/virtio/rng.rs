//! virtio entropy device: one request queue whose write-only buffers are
//! filled from an [`EntropySource`].

use alloc::boxed::Box;

use super::queue::QueueError;
use super::{DeviceIo, VirtioDevice, DEVICE_TYPE_ENTROPY};

pub trait EntropySource {
    fn fill(&mut self, buf: &mut [u8]);
}

/// Deterministic SplitMix64 stream: for tests and fuzzing, never for a
/// guest that needs real entropy.
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

impl EntropySource for SplitMix64 {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

const REQUEST_QUEUE: u16 = 0;
/// Bytes given per request at most (the device may return fewer than the
/// buffer holds); bounds the work one request causes.
pub const MAX_REQUEST: u64 = 64 * 1024;
const CHUNK: usize = 256;

pub struct Rng {
    source: Box<dyn EntropySource>,
}

impl Rng {
    pub fn new(source: Box<dyn EntropySource>) -> Self {
        Self { source }
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u16 {
        DEVICE_TYPE_ENTROPY
    }

    fn queue_count(&self) -> u16 {
        1
    }

    fn features(&self) -> u64 {
        0
    }

    fn config_len(&self) -> usize {
        0
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn reset(&mut self) {}

    fn process(&mut self, io: &mut DeviceIo<'_>) -> Result<(), QueueError> {
        let mem = io.mem();
        while let Some(chain) = io.pop(REQUEST_QUEUE)? {
            let mut writer = chain.writer(MAX_REQUEST);
            let mut chunk = [0u8; CHUNK];
            while writer.remaining() > 0 {
                let len = writer.remaining().min(CHUNK as u64) as usize;
                self.source.fill(&mut chunk[..len]);
                writer.write(mem, &chunk[..len])?;
            }
            io.push(REQUEST_QUEUE, &chain, writer.done() as u32)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::mock::{Driver, Machine};
    use crate::virtio::VIRTIO_F_VERSION_1;

    #[test]
    fn fills_write_only_buffers_from_the_source() {
        let m = Machine::new();
        m.plug(Rng::new(Box::new(SplitMix64(7))));
        let mut driver = Driver::probe(&m, DEVICE_TYPE_ENTROPY);
        assert_eq!(driver.device_cfg, None, "no device configuration");
        driver.bring_up(VIRTIO_F_VERSION_1, 1);
        let (a, b) = (m.alloc(40, 8), m.alloc(24, 8));
        let head = driver.add(0, &[(a, 40, true), (b, 24, true)]);
        driver.kick(0);
        assert_eq!(driver.used(0), Some((u32::from(head), 64)));
        let mut expected = [0u8; 64];
        SplitMix64(7).fill(&mut expected);
        assert_eq!(m.mem.bytes(a, 40), expected[..40]);
        assert_eq!(m.mem.bytes(b, 24), expected[40..]);
        assert_eq!(m.msi.count(1), 1, "queue 0 signals on vector 1");
    }

    #[test]
    fn huge_requests_get_a_bounded_answer() {
        let m = Machine::new();
        m.plug(Rng::new(Box::new(SplitMix64(1))));
        let mut driver = Driver::probe(&m, DEVICE_TYPE_ENTROPY);
        driver.bring_up(VIRTIO_F_VERSION_1, 1);
        let buf = m.alloc(2 * MAX_REQUEST, 8);
        driver.add(0, &[(buf, 2 * MAX_REQUEST as u32, true)]);
        driver.kick(0);
        assert_eq!(driver.used(0), Some((0, MAX_REQUEST as u32)));
    }
}
