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

/// Sending the rest this quickly is not worth another round.
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
    /// What a stop costs besides sending the rest: stopping every
    /// thread, the final dirty sync, and the receiver's answer after the
    /// last frame, as measured in this migration.
    pub fixed_cost: Duration,
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
    /// Give up (or, with force_downtime, stop) once the dirty rate has
    /// stayed above what can be sent for [`HOPELESS_SYNCS`] syncs in a row,
    /// instead of running to max_iterations.
    pub stop_early: bool,
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

/// Syncs in a row with the dirty rate above the rate pages can be sent
/// at, after which pre-copy is taken not to converge.
pub const HOPELESS_SYNCS: u32 = 3;

/// Decides, sync after sync. Its only state is what it saw at previous
/// syncs and auto-converge's counters.
#[derive(Debug, Default)]
pub struct Planner {
    prev_pending: Option<u64>,
    /// Syncs in a row at which the process dirtied faster than we send.
    outrun: u32,
    auto: AutoConverge,
}

impl Planner {
    /// The throttle currently asked for (0: none).
    pub fn throttle_percent(&self) -> u32 {
        self.auto.percent
    }

    pub fn decide(&mut self, i: &PlanInputs, l: &Limits) -> Plan {
        let sending = expected_downtime(i.pending_bytes, i.ratio, i.wire_rate);
        let expected = sending.saturating_add(i.fixed_cost);
        // Within the limit, one more round is still worth it when it would
        // at least halve the pause: sending P bytes takes P / T seconds,
        // during which rate × P / T bytes get dirty. Both in theory and as
        // observed since the last sync (whose costs the theory does not
        // see). A round shrinks only the sending part, so a round is
        // never worth it when that part is already negligible, however
        // long the pause's other parts: an idle process would otherwise
        // run rounds of nothing to the iteration cap. (The other parts
        // are not fixed either: the sync and the round's tail grow with
        // the dirty set, so they do not bound what a round can gain.)
        let raw_rate = i.wire_rate * i.ratio;
        let shrink = if raw_rate > 0.0 {
            i.dirty_rate / raw_rate
        } else {
            1.0
        };
        let halving = shrink < 0.5 && self.prev_pending.is_none_or(|p| i.pending_bytes * 2 <= p);
        // Outrun: dirtied at least as fast as we send, or the rest shrank
        // by less than a tenth since the last sync (a working set
        // rewritten every round: its size wobbles by a few pages), or
        // nothing is left to send and the other costs alone are over the
        // limit (`compare` hashing a large process in each sync): no
        // round shortens them. (With pages to send they may be a big
        // round's tail, which a smaller round shortens.)
        // The bulk round says little about the dirty rate: count from the
        // first iterate round on.
        let stuck = self
            .prev_pending
            .is_some_and(|p| i.pending_bytes as f64 > p as f64 * 0.9);
        self.prev_pending = Some(i.pending_bytes);
        let fixed_over = sending <= NOT_WORTH_A_ROUND && i.fixed_cost > l.downtime_limit;
        self.outrun = if i.round > 0 && (shrink >= 1.0 || stuck || fixed_over) {
            self.outrun + 1
        } else {
            0
        };
        // auto-converge needs rounds to throttle: it is never hopeless early.
        let hopeless = l.stop_early && l.auto_converge.is_none() && self.outrun >= HOPELESS_SYNCS;
        let at_cap = i.round >= l.max_iterations || hopeless;
        let decision = if expected <= l.downtime_limit
            && (!halving || sending <= NOT_WORTH_A_ROUND || at_cap)
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
            stop_early: false,
            force_downtime: false,
            auto_converge: None,
        }
    }

    /// What `send` runs with when no --max-iterations is given: 30 rounds,
    /// but give up as soon as it is hopeless.
    fn cli_default_limits() -> Limits {
        Limits {
            stop_early: true,
            max_iterations: 30,
            ..limits()
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
    fn nothing_worth_sending_ends_the_rounds_within_the_limit() {
        // An idle process: nothing (or next to nothing) left to send, and
        // 6 ms of stop, sync and answer that no round removes: go now.
        for pending in [0, 4096, 100_000] {
            let mut p = Planner::default();
            let i = PlanInputs {
                fixed_cost: Duration::from_millis(6),
                ..inputs(1, pending, 0.0)
            };
            assert_eq!(p.decide(&i, &limits()).decision, Decision::Downtime);
        }
        // 20 ms to send next to 6 ms fixed, dirtying slowly: 26 ms now,
        // about 8 after a round: iterate.
        let mut p = Planner::default();
        let i = PlanInputs {
            fixed_cost: Duration::from_millis(6),
            ..inputs(1, 2_000_000, 10e6)
        };
        assert!(matches!(
            p.decide(&i, &limits()).decision,
            Decision::Iterate { .. }
        ));
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

    #[test]
    fn gives_up_early_when_the_process_outruns_the_link() {
        let l = cli_default_limits();
        // Dirtying at 200 MB/s against 100 MB/s sent: hopeless.
        let mut p = Planner::default();
        let mut last = None;
        for round in 0..=HOPELESS_SYNCS {
            last = Some(p.decide(&inputs(round, 100_000_000, 200e6), &l).decision);
            if round < HOPELESS_SYNCS {
                assert!(matches!(last, Some(Decision::Iterate { .. })), "{round}");
            }
        }
        assert_eq!(last, Some(Decision::GiveUp));
        // A slower writer, whose rest shrinks, keeps iterating; so does a
        // fast one under an explicit cap.
        let mut p = Planner::default();
        let mut pending = 1_000_000_000f64;
        for round in 0..6 {
            let d = p.decide(&inputs(round, pending as u64, 60e6), &l).decision;
            assert!(matches!(d, Decision::Iterate { .. }), "{round}");
            pending *= 0.6;
        }
        // A working set rewritten every round: the rest hardly shrinks,
        // even when the measured rate is a little under the link's.
        let mut p = Planner::default();
        let d = (0..=HOPELESS_SYNCS)
            .map(|round| {
                let pending = 100_000_000 - round as u64 * 4096;
                p.decide(&inputs(round, pending, 95e6), &l).decision
            })
            .last();
        assert_eq!(d, Some(Decision::GiveUp));
        let mut p = Planner::default();
        for round in 0..5 {
            let d = p
                .decide(&inputs(round, 100_000_000, 200e6), &limits())
                .decision;
            assert!(matches!(d, Decision::Iterate { .. }), "{round}");
        }
        // With force-downtime it stops instead of failing.
        let forced = Limits {
            force_downtime: true,
            ..l
        };
        let mut p = Planner::default();
        for round in 0..HOPELESS_SYNCS {
            p.decide(&inputs(round, 100_000_000, 200e6), &forced);
        }
        let d = p.decide(&inputs(HOPELESS_SYNCS, 100_000_000, 200e6), &forced);
        assert_eq!(d.decision, Decision::Downtime);
    }

    #[test]
    fn fixed_costs_over_the_limit_are_hopeless() {
        // Nothing left to send, but stopping and the last sync take
        // 500 ms against a 300 ms limit: no round helps.
        let l = cli_default_limits();
        let i = |round| PlanInputs {
            fixed_cost: Duration::from_millis(500),
            ..inputs(round, 0, 0.0)
        };
        let mut p = Planner::default();
        let d: Vec<_> = (0..=HOPELESS_SYNCS)
            .map(|r| p.decide(&i(r), &l).decision)
            .collect();
        assert!(d[..HOPELESS_SYNCS as usize]
            .iter()
            .all(|d| matches!(d, Decision::Iterate { .. })));
        assert_eq!(d[HOPELESS_SYNCS as usize], Decision::GiveUp);
        let forced = Limits {
            force_downtime: true,
            ..l
        };
        let mut p = Planner::default();
        let d = (0..=HOPELESS_SYNCS)
            .map(|r| p.decide(&i(r), &forced).decision)
            .last();
        assert_eq!(d, Some(Decision::Downtime));
    }

    #[test]
    fn a_long_tail_with_pages_to_send_is_not_hopeless() {
        // A slow link: the last round's tail (its queued batches) took
        // 400 ms, over the limit, but 20 MB are still to send and a
        // smaller round has a shorter tail: keep iterating.
        let l = cli_default_limits();
        let mut p = Planner::default();
        let mut pending = 20_000_000f64;
        for round in 0..6 {
            let i = PlanInputs {
                fixed_cost: Duration::from_millis(400),
                ..inputs(round, pending as u64, 10e6)
            };
            let d = p.decide(&i, &l).decision;
            assert!(matches!(d, Decision::Iterate { .. }), "{round}");
            pending *= 0.4;
        }
    }

    #[test]
    fn fixed_costs_count_in_the_estimate() {
        let mut p = Planner::default();
        // 250 ms of sending fits 300 ms, but not with 80 ms of stop and sync.
        let i = PlanInputs {
            fixed_cost: Duration::from_millis(80),
            ..inputs(1, 25_000_000, 90e6)
        };
        let plan = p.decide(&i, &limits());
        assert_eq!(plan.expected_downtime, Duration::from_millis(330));
        assert!(matches!(plan.decision, Decision::Iterate { .. }));
    }
}
