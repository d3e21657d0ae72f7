//! Time source. Production uses the system clock; `serve --test-clock` lets
//! the admin API move it forward so tests can expire tokens, keys and
//! soft-deleted keys without waiting.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug, Default)]
pub struct Clock {
    offset_secs: AtomicI64,
}

impl Clock {
    pub fn new() -> Self {
        Clock::default()
    }
    /// Seconds since the Unix epoch, including any test offset.
    pub fn now(&self) -> i64 {
        let sys = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        sys + self.offset_secs.load(Ordering::SeqCst)
    }
    pub fn advance(&self, secs: i64) {
        self.offset_secs.fetch_add(secs, Ordering::SeqCst);
    }
    pub fn offset(&self) -> i64 {
        self.offset_secs.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn advance_moves_now() {
        let c = Clock::new();
        let a = c.now();
        c.advance(86_400);
        assert!(c.now() >= a + 86_400);
        assert_eq!(c.offset(), 86_400);
    }
}
