//! Kernel-memory quotas: what a protection domain may still cause the
//! kernel to allocate. Exhaustion is an error value, never a panic.

/// Bytes of kernel memory granted (`limit`) and in use (`used`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Quota {
    pub limit: u64,
    pub used: u64,
}

/// The quota cannot cover a charge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaExceeded;

impl Quota {
    pub const fn new(limit: u64) -> Self {
        Self { limit, used: 0 }
    }

    /// Takes `bytes`, or nothing if that would pass the limit.
    pub fn charge(&mut self, bytes: u64) -> Result<(), QuotaExceeded> {
        let used = self.used.checked_add(bytes).ok_or(QuotaExceeded)?;
        if used > self.limit {
            return Err(QuotaExceeded);
        }
        self.used = used;
        Ok(())
    }

    /// Gives `bytes` back; never below zero.
    pub fn refund(&mut self, bytes: u64) {
        self.used = self.used.saturating_sub(bytes);
    }

    pub const fn available(&self) -> u64 {
        self.limit.saturating_sub(self.used)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_up_to_the_limit_exactly() {
        let mut quota = Quota::new(100);
        assert_eq!(quota.charge(60), Ok(()));
        assert_eq!(quota.charge(41), Err(QuotaExceeded));
        assert_eq!(quota.used, 60, "a failed charge takes nothing");
        assert_eq!(quota.charge(40), Ok(()));
        assert_eq!(quota.available(), 0);
        assert_eq!(quota.charge(1), Err(QuotaExceeded));
    }

    #[test]
    fn refunds_restore_and_never_underflow() {
        let mut quota = Quota::new(10);
        quota.charge(10).unwrap();
        quota.refund(4);
        assert_eq!(quota.available(), 4);
        quota.refund(1000);
        assert_eq!(quota.used, 0);
    }

    #[test]
    fn huge_charges_do_not_wrap() {
        let mut quota = Quota::new(u64::MAX);
        quota.charge(u64::MAX - 1).unwrap();
        assert_eq!(quota.charge(2), Err(QuotaExceeded));
        assert_eq!(quota.charge(u64::MAX), Err(QuotaExceeded));
    }
}
