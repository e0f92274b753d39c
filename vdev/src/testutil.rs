//! Test doubles the models' tests (and the fuzz targets, feature
//! `test-utils`) share: a clock the test sets and an
//! interrupt line that remembers its level.

use alloc::rc::Rc;
use core::cell::Cell;

use crate::{Clock, IrqLine};

/// Guest time the test moves by hand (nanoseconds).
#[derive(Clone, Default)]
pub struct FakeClock(pub Rc<Cell<u64>>);

impl FakeClock {
    pub fn advance(&self, ns: u64) {
        self.0.set(self.0.get().saturating_add(ns));
    }
}

impl Clock for FakeClock {
    fn now_ns(&self) -> u64 {
        self.0.get()
    }
}

/// A level-triggered line; `0` is its current level.
#[derive(Clone, Default)]
pub struct Line(pub Rc<Cell<bool>>);

impl IrqLine for Line {
    fn set_level(&self, high: bool) {
        self.0.set(high);
    }
}
