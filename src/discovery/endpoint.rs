//! One endpoint of a balanced channel: its connection, the calls it has in
//! flight (the balancer's load measure) and its outlier state.
//!
//! Why ejection: a dead endpoint fails fast, so any "least loaded" measure
//! makes it look like the best choice and it draws most of the traffic.
//! After `eject_after` failures in a row it is ejected for a back-off that
//! doubles with each ejection (capped); when the back-off ends it is on
//! probation: one success restores it, one failure ejects it again.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;
use tonic::transport::Channel;

/// How failures eject an endpoint.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EjectionPolicy {
    /// Failures in a row (connect failures, UNAVAILABLE, deadline) that eject.
    pub eject_after: u32,
    /// The first ejection's length; each further one doubles it.
    pub base: Duration,
    /// Longest ejection, however many came before.
    pub max: Duration,
}

/// The outlier state machine, apart from any I/O so it can be tested on a
/// paused clock.
#[derive(Debug, Default)]
pub struct Outlier {
    failures_in_a_row: u32,
    /// Ejections since the last success: the back-off's exponent.
    ejections: u32,
    ejected_until: Option<Instant>,
}

impl Outlier {
    /// Whether calls may go here at `now`: not ejected, or the ejection is over
    /// (on probation).
    pub fn is_available(&self, now: Instant) -> bool {
        self.ejected_until.is_none_or(|until| now >= until)
    }

    /// Records a success: clears the failure count and the back-off, ending any
    /// probation.
    pub fn record_success(&mut self) {
        self.failures_in_a_row = 0;
        self.ejections = 0;
        self.ejected_until = None;
    }

    /// Records a failure; answers the ejection's end when it ejects.
    pub fn record_failure(&mut self, policy: &EjectionPolicy, now: Instant) -> Option<Instant> {
        if !self.is_available(now) {
            // A call that was already in flight when it was ejected.
            return None;
        }
        self.failures_in_a_row += 1;
        let on_probation = self.ejected_until.is_some();
        if self.failures_in_a_row < policy.eject_after.max(1) && !on_probation {
            return None;
        }
        let factor = 2u32.saturating_pow(self.ejections.min(16));
        let length = policy.base.saturating_mul(factor).min(policy.max);
        self.ejections += 1;
        self.failures_in_a_row = 0;
        let until = now + length;
        self.ejected_until = Some(until);
        Some(until)
    }
}

/// An endpoint as the balancer holds it.
#[derive(Debug)]
pub struct Endpoint {
    /// The instance's address, as the registry announced it; the endpoint's
    /// identity in the set.
    pub addr: SocketAddr,
    /// An `f64`'s bits: the registry may change it while calls run.
    weight: AtomicU64,
    /// The connection calls to this endpoint go over.
    pub channel: Channel,
    in_flight: AtomicUsize,
    outlier: Mutex<Outlier>,
}

impl Endpoint {
    /// A fresh endpoint: no call in flight, not ejected.
    pub fn new(addr: SocketAddr, weight: f64, channel: Channel) -> Self {
        Self {
            addr,
            weight: AtomicU64::new(weight.to_bits()),
            channel,
            in_flight: AtomicUsize::new(0),
            outlier: Mutex::new(Outlier::default()),
        }
    }

    /// Relative share of traffic, as last announced.
    pub fn weight(&self) -> f64 {
        f64::from_bits(self.weight.load(Ordering::Relaxed))
    }

    /// Takes a weight the registry announced; calls in flight are unaffected.
    pub fn set_weight(&self, weight: f64) {
        self.weight.store(weight.to_bits(), Ordering::Relaxed);
    }

    /// Calls in flight now; divided by the weight, the balancer's load measure.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Whether calls may go here at `now` (see [`Outlier::is_available`]).
    pub fn is_available(&self, now: Instant) -> bool {
        self.outlier.lock().is_available(now)
    }

    /// Counts a call in flight until the guard drops.
    pub fn start_call(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self)
    }

    /// Records a call's outcome under `policy`; logs an ejection when a failure
    /// causes one, and answers whether it did.
    pub fn record(&self, ok: bool, policy: &EjectionPolicy) -> bool {
        let mut outlier = self.outlier.lock();
        if ok {
            outlier.record_success();
            return false;
        }
        let Some(until) = outlier.record_failure(policy, Instant::now()) else {
            return false;
        };
        tracing::warn!(
            endpoint = %self.addr,
            for_ms = (until - Instant::now()).as_millis() as u64,
            "ejecting an endpoint after repeated failures"
        );
        true
    }
}

/// Guard from [`Endpoint::start_call`]: the call counts as in flight until it
/// drops, however the call ends.
pub struct InFlight<'a>(&'a Endpoint);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: EjectionPolicy = EjectionPolicy {
        eject_after: 3,
        base: Duration::from_secs(1),
        max: Duration::from_secs(8),
    };

    #[tokio::test(start_paused = true)]
    async fn three_failures_in_a_row_eject_with_a_doubling_capped_back_off() {
        let mut o = Outlier::default();
        let now = Instant::now();
        assert_eq!(o.record_failure(&POLICY, now), None);
        assert_eq!(o.record_failure(&POLICY, now), None);
        assert_eq!(
            o.record_failure(&POLICY, now),
            Some(now + Duration::from_secs(1))
        );
        assert!(!o.is_available(now));

        // Probation: one failure ejects again, for twice as long.
        tokio::time::advance(Duration::from_secs(1)).await;
        let now = Instant::now();
        assert!(o.is_available(now));
        assert_eq!(
            o.record_failure(&POLICY, now),
            Some(now + Duration::from_secs(2))
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        let now = Instant::now();
        assert_eq!(
            o.record_failure(&POLICY, now),
            Some(now + Duration::from_secs(4))
        );
        tokio::time::advance(Duration::from_secs(4)).await;
        let now = Instant::now();
        assert_eq!(
            o.record_failure(&POLICY, now),
            Some(now + Duration::from_secs(8))
        );
        tokio::time::advance(Duration::from_secs(8)).await;
        let now = Instant::now();
        assert_eq!(
            o.record_failure(&POLICY, now),
            Some(now + Duration::from_secs(8)),
            "capped"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_restores_and_resets_the_back_off() {
        let mut o = Outlier::default();
        let now = Instant::now();
        for _ in 0..3 {
            o.record_failure(&POLICY, now);
        }
        tokio::time::advance(Duration::from_secs(1)).await;
        o.record_success();
        let now = Instant::now();
        assert_eq!(
            o.record_failure(&POLICY, now),
            None,
            "no longer on probation"
        );
        o.record_failure(&POLICY, now);
        assert_eq!(
            o.record_failure(&POLICY, now),
            Some(now + Duration::from_secs(1)),
            "back to the base back-off"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn failures_in_between_successes_never_eject() {
        let mut o = Outlier::default();
        for _ in 0..100 {
            assert_eq!(o.record_failure(&POLICY, Instant::now()), None);
            assert_eq!(o.record_failure(&POLICY, Instant::now()), None);
            o.record_success();
        }
        assert!(o.is_available(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn failures_of_calls_sent_before_an_ejection_do_not_extend_it() {
        let mut o = Outlier::default();
        let now = Instant::now();
        for _ in 0..3 {
            o.record_failure(&POLICY, now);
        }
        for _ in 0..10 {
            assert_eq!(o.record_failure(&POLICY, now), None);
        }
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(o.is_available(Instant::now()));
    }
}
