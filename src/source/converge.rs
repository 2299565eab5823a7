//! Convergence: the planner that decides after each dirty sync whether to
//! iterate, go to downtime or give up, and auto-converge's bookkeeping of
//! how hard to throttle a process that dirties memory faster than the link
//! drains it. Everything here is arithmetic on measurements, with no I/O,
//! so it is tested on its own; the throttle itself is in `throttle.rs`.

use std::time::Duration;

/// QEMU's names and defaults.
#[derive(Debug, Clone, Copy)]
pub struct ThrottleParams {
    /// throttle-trigger-threshold: % of transferred bytes that dirty bytes
    /// in a round must exceed (twice in a row) to throttle.
    pub trigger_threshold: u32,
    /// cpu-throttle-initial.
    pub initial: u32,
    /// cpu-throttle-increment.
    pub increment: u32,
    /// max-cpu-throttle.
    pub max: u32,
}

impl Default for ThrottleParams {
    fn default() -> Self {
        ThrottleParams {
            trigger_threshold: 50,
            initial: 20,
            increment: 10,
            max: 99,
        }
    }
}

/// Auto-converge bookkeeping, as QEMU's mig_throttle_guest_down logic.
#[derive(Debug, Default)]
pub struct AutoConverge {
    high_rounds: u32,
    pub percent: u32,
}

impl AutoConverge {
    /// After a round that transferred `sent` bytes while `dirtied` bytes
    /// were dirtied: returns the new throttle percentage if it changed.
    pub fn update(&mut self, p: &ThrottleParams, dirtied: u64, sent: u64) -> Option<u32> {
        if dirtied as f64 > sent as f64 * p.trigger_threshold as f64 / 100.0 {
            self.high_rounds += 1;
            if self.high_rounds >= 2 {
                self.high_rounds = 0;
                let next = if self.percent == 0 {
                    p.initial
                } else {
                    (self.percent + p.increment).min(p.max)
                };
                if next != self.percent {
                    self.percent = next;
                    return Some(next);
                }
            }
        } else {
            self.high_rounds = 0;
        }
        None
    }
}

/// An expected downtime this short is not worth another round.
pub const NOT_WORTH_A_ROUND: Duration = Duration::from_millis(2);

/// Expected downtime for `dirty_bytes` at `wire_rate` bytes/s, given the
/// compression ratio seen so far.
pub fn expected_downtime(dirty_bytes: u64, ratio: f64, wire_rate: f64) -> Duration {
    if wire_rate <= 0.0 {
        return Duration::MAX;
    }
    let wire = dirty_bytes as f64 / ratio.max(1.0);
    Duration::from_secs_f64(wire / wire_rate)
}

/// What the planner knows after a dirty sync.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlanInputs {
    /// Iterate rounds sent so far (the bulk round is round 0).
    pub round: u32,
    /// Raw bytes the final round would send if the process stopped now.
    pub pending_bytes: u64,
    /// Wire bytes per second over the rounds so far.
    pub wire_rate: f64,
    /// Raw bytes per wire byte so far.
    pub ratio: f64,
    /// Raw bytes dirtied per second since the previous sync.
    pub dirty_rate: f64,
    /// Raw bytes dirtied during the last round, and wire bytes it sent
    /// (auto-converge compares the two, as QEMU does per period).
    pub last_round_dirtied: u64,
    pub last_round_sent: u64,
}

/// The limits the planner holds the migration to.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub downtime_limit: Duration,
    pub max_iterations: u32,
    pub force_downtime: bool,
    pub auto_converge: Option<ThrottleParams>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Send another round; set the throttle to this percentage first.
    Iterate { throttle: Option<u32> },
    /// Stop the process and send the rest.
    Downtime,
    /// The iteration cap is reached and the rest would not fit the limit.
    GiveUp,
}

/// The planner's answer, with the estimate it was based on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plan {
    pub decision: Decision,
    pub expected_downtime: Duration,
}

/// Decides, sync after sync. Its only state is what it saw at the previous
/// sync and auto-converge's counters.
#[derive(Debug, Default)]
pub struct Planner {
    prev_pending: Option<u64>,
    auto: AutoConverge,
}

impl Planner {
    /// The throttle currently asked for (0: none).
    pub fn throttle_percent(&self) -> u32 {
        self.auto.percent
    }

    pub fn decide(&mut self, i: &PlanInputs, l: &Limits) -> Plan {
        let expected = expected_downtime(i.pending_bytes, i.ratio, i.wire_rate);
        // Within the limit, one more round is still worth it when it would
        // at least halve the pause: sending P bytes takes P / T seconds,
        // during which rate × P / T bytes get dirty. Both in theory and as
        // observed since the last sync (whose fixed costs the theory does
        // not see).
        let raw_rate = i.wire_rate * i.ratio;
        let shrink = if raw_rate > 0.0 {
            i.dirty_rate / raw_rate
        } else {
            1.0
        };
        let halving = shrink < 0.5 && self.prev_pending.is_none_or(|p| i.pending_bytes * 2 <= p);
        self.prev_pending = Some(i.pending_bytes);
        let at_cap = i.round >= l.max_iterations;
        let decision = if expected <= l.downtime_limit
            && (!halving || expected <= NOT_WORTH_A_ROUND || at_cap)
        {
            Decision::Downtime
        } else if at_cap {
            if l.force_downtime || l.auto_converge.is_some() {
                Decision::Downtime
            } else {
                Decision::GiveUp
            }
        } else {
            let throttle = match (&l.auto_converge, i.round) {
                (Some(p), r) if r > 0 => {
                    self.auto.update(p, i.last_round_dirtied, i.last_round_sent)
                }
                _ => None,
            };
            Decision::Iterate { throttle }
        };
        Plan {
            decision,
            expected_downtime: expected,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_converge_steps_like_qemu() {
        let p = ThrottleParams::default();
        let mut a = AutoConverge::default();
        assert_eq!(a.update(&p, 100, 100), None); // first high round
        assert_eq!(a.update(&p, 100, 100), Some(20)); // second: initial
        assert_eq!(a.update(&p, 10, 100), None); // low round resets
        assert_eq!(a.update(&p, 100, 100), None);
        assert_eq!(a.update(&p, 100, 100), Some(30));
        for _ in 0..40 {
            a.update(&p, 100, 100);
        }
        assert_eq!(a.percent, 99);
    }

    #[test]
    fn downtime_estimate() {
        let d = expected_downtime(100 << 20, 4.0, (25 << 20) as f64);
        assert_eq!(d, Duration::from_secs(1));
        assert_eq!(expected_downtime(1, 1.0, 0.0), Duration::MAX);
    }

    fn limits() -> Limits {
        Limits {
            downtime_limit: Duration::from_millis(300),
            max_iterations: 5,
            force_downtime: false,
            auto_converge: None,
        }
    }

    /// 100 MB/s on the wire, ratio 1.
    fn inputs(round: u32, pending: u64, dirty_rate: f64) -> PlanInputs {
        PlanInputs {
            round,
            pending_bytes: pending,
            wire_rate: 100e6,
            ratio: 1.0,
            dirty_rate,
            ..Default::default()
        }
    }

    #[test]
    fn stops_when_the_rest_fits_and_another_round_would_not_halve_it() {
        let mut p = Planner::default();
        // 10 MB = 100 ms fits 300 ms; dirtying at 80 MB/s, a round would
        // not halve it: go.
        let plan = p.decide(&inputs(1, 10_000_000, 80e6), &limits());
        assert_eq!(plan.decision, Decision::Downtime);
        assert_eq!(plan.expected_downtime, Duration::from_millis(100));
    }

    #[test]
    fn iterates_while_a_round_still_halves_the_pause() {
        let mut p = Planner::default();
        // Fits, but dirtying at 10 MB/s a round shrinks it tenfold.
        let plan = p.decide(&inputs(1, 10_000_000, 10e6), &limits());
        assert_eq!(plan.decision, Decision::Iterate { throttle: None });
        // Next sync: pending did not halve: stop iterating.
        let plan = p.decide(&inputs(2, 6_000_000, 10e6), &limits());
        assert_eq!(plan.decision, Decision::Downtime);
        // A pause too short to matter is never worth a round.
        let mut p = Planner::default();
        let plan = p.decide(&inputs(1, 100_000, 0.0), &limits());
        assert_eq!(plan.decision, Decision::Downtime);
    }

    #[test]
    fn over_the_limit_iterates_then_gives_up_or_forces() {
        let mut p = Planner::default();
        let big = inputs(1, 100_000_000, 200e6); // 1 s > 300 ms
        assert!(matches!(
            p.decide(&big, &limits()).decision,
            Decision::Iterate { .. }
        ));
        let at_cap = inputs(5, 100_000_000, 200e6);
        assert_eq!(p.decide(&at_cap, &limits()).decision, Decision::GiveUp);
        let forced = Limits {
            force_downtime: true,
            ..limits()
        };
        assert_eq!(p.decide(&at_cap, &forced).decision, Decision::Downtime);
        // No measured rate yet: the estimate is unbounded.
        let unknown = PlanInputs {
            wire_rate: 0.0,
            ..big
        };
        assert_eq!(
            p.decide(&unknown, &limits()).expected_downtime,
            Duration::MAX
        );
    }

    #[test]
    fn auto_converge_throttles_after_two_hot_rounds() {
        let mut p = Planner::default();
        let l = Limits {
            auto_converge: Some(ThrottleParams::default()),
            ..limits()
        };
        let hot = PlanInputs {
            last_round_dirtied: 100,
            last_round_sent: 100,
            ..inputs(1, 100_000_000, 200e6)
        };
        assert_eq!(
            p.decide(&hot, &l).decision,
            Decision::Iterate { throttle: None }
        );
        let hot2 = PlanInputs { round: 2, ..hot };
        assert_eq!(
            p.decide(&hot2, &l).decision,
            Decision::Iterate { throttle: Some(20) }
        );
        assert_eq!(p.throttle_percent(), 20);
        // At the cap, auto-converge finishes instead of failing.
        let cap = PlanInputs { round: 5, ..hot };
        assert_eq!(p.decide(&cap, &l).decision, Decision::Downtime);
    }
}
