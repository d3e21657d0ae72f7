//! The key monitor's policy, with no I/O: what one check of the customer
//! key means for the server. A refusal makes it Inaccessible at once; an
//! outage only once it has lasted the grace period. While Inaccessible it
//! retries by itself after an outage, or always with `auto_revalidate`.
//! The loop that sleeps and asks the vault is [`crate::control::monitor`].

use std::time::{Duration, Instant};

use crate::keys::Loss;

/// What the server should do after a check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The key answered: keep serving.
    Serve,
    /// The vault is unreachable, within the grace period: keep serving.
    Grace { left: Duration },
    /// Go Inaccessible, for this loss.
    Inaccessible(Loss),
}

/// The monitor's memory between checks.
#[derive(Debug, Clone)]
pub struct KeyMonitor {
    grace: Duration,
    auto_revalidate: bool,
    outage_since: Option<Instant>,
    last_loss_was_outage: bool,
}

impl KeyMonitor {
    pub fn new(grace: Duration, auto_revalidate: bool) -> Self {
        KeyMonitor {
            grace,
            auto_revalidate,
            outage_since: None,
            last_loss_was_outage: false,
        }
    }

    /// One check of a Ready server's key, made at `now`.
    pub fn on_check(&mut self, now: Instant, result: Result<(), Loss>) -> Verdict {
        let loss = match result {
            Ok(()) => {
                self.outage_since = None;
                return Verdict::Serve;
            }
            Err(loss) => loss,
        };
        if !loss.outage {
            self.last_loss_was_outage = false;
            return Verdict::Inaccessible(loss);
        }
        let since = *self.outage_since.get_or_insert(now);
        let lasted = now.saturating_duration_since(since);
        if lasted < self.grace {
            return Verdict::Grace {
                left: self.grace - lasted,
            };
        }
        self.last_loss_was_outage = true;
        Verdict::Inaccessible(Loss {
            reason: format!(
                "the vault has been unreachable for {} s: {}",
                lasted.as_secs(),
                loss.reason
            ),
            ..loss
        })
    }

    /// Whether an Inaccessible server should try to revalidate by itself.
    pub fn retry_when_inaccessible(&self) -> bool {
        self.auto_revalidate || self.last_loss_was_outage
    }

    /// The server is Ready again (revalidated by the monitor or by hand).
    pub fn on_ready(&mut self) {
        self.outage_since = None;
        self.last_loss_was_outage = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmk::Cause;

    fn refused() -> Result<(), Loss> {
        Err(Loss::refused(Cause::Disabled, "key k is disabled"))
    }

    fn down() -> Result<(), Loss> {
        Err(Loss::outage("connection refused"))
    }

    #[test]
    fn a_refusal_has_no_grace_and_is_not_retried_alone() {
        let mut m = KeyMonitor::new(Duration::from_secs(60), false);
        let t = Instant::now();
        assert_eq!(m.on_check(t, Ok(())), Verdict::Serve);
        match m.on_check(t, refused()) {
            Verdict::Inaccessible(l) => {
                assert_eq!(l.cause, Cause::Disabled);
                assert!(!l.outage);
            }
            other => panic!("a refusal must make the server Inaccessible, got {other:?}"),
        }
        assert!(!m.retry_when_inaccessible());
        let mut auto = KeyMonitor::new(Duration::from_secs(60), true);
        assert!(matches!(
            auto.on_check(t, refused()),
            Verdict::Inaccessible(_)
        ));
        assert!(auto.retry_when_inaccessible());
    }

    #[test]
    fn an_outage_is_served_through_until_the_grace_period_ends() {
        let grace = Duration::from_secs(10);
        let mut m = KeyMonitor::new(grace, false);
        let t0 = Instant::now();
        assert_eq!(m.on_check(t0, down()), Verdict::Grace { left: grace });
        assert_eq!(
            m.on_check(t0 + Duration::from_secs(4), down()),
            Verdict::Grace {
                left: Duration::from_secs(6)
            }
        );
        match m.on_check(t0 + Duration::from_secs(10), down()) {
            Verdict::Inaccessible(l) => {
                assert!(l.outage);
                assert_eq!(l.cause, Cause::Unreachable);
                assert!(l.reason.contains("unreachable for 10 s"), "{}", l.reason);
            }
            other => panic!("the grace period is over, got {other:?}"),
        }
        // An outage retries by itself, and being Ready again resets that.
        assert!(m.retry_when_inaccessible());
        m.on_ready();
        assert!(!m.retry_when_inaccessible());
    }

    #[test]
    fn an_answer_in_between_restarts_the_grace_period() {
        let grace = Duration::from_secs(10);
        let mut m = KeyMonitor::new(grace, false);
        let t0 = Instant::now();
        m.on_check(t0, down());
        assert_eq!(
            m.on_check(t0 + Duration::from_secs(8), Ok(())),
            Verdict::Serve
        );
        assert_eq!(
            m.on_check(t0 + Duration::from_secs(12), down()),
            Verdict::Grace { left: grace }
        );
        // A refusal during an outage is still a refusal, at once.
        assert!(matches!(
            m.on_check(t0 + Duration::from_secs(13), refused()),
            Verdict::Inaccessible(Loss { outage: false, .. })
        ));
    }
}
