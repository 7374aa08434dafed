//! Statistics of repeated measurements: medians, spreads and latency percentiles.

/// The median of `values` (mean of the two middle values for an even count); 0 when empty.
pub(crate) fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

/// `(max - min) / median` of `values` in percent; 0 when empty or the median is 0.
pub(crate) fn spread_pct(values: &[f64]) -> f64 {
    let m = median(values);
    if m <= 0.0 {
        return 0.0;
    }
    let max = values.iter().copied().fold(f64::MIN, f64::max);
    let min = values.iter().copied().fold(f64::MAX, f64::min);
    100.0 * (max - min) / m
}

/// The `q`-quantile (0..=1, nearest rank) of `sorted`, which must be sorted; 0 when empty.
pub(crate) fn quantile(sorted: &[u32], q: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// One timed run of one workload against one master.
#[derive(Clone, Debug, Default)]
pub(crate) struct Run {
    /// Operations (put commits or key lookups) completed per second.
    pub(crate) ops_per_sec: f64,
    /// Calls (round trips: a put pair counts as one) per second.
    pub(crate) calls_per_sec: f64,
    /// Median latency of a call, microseconds.
    pub(crate) p50_us: u32,
    /// 99th percentile latency of a call, microseconds.
    pub(crate) p99_us: u32,
    /// CPU used by the master processes, in cores (CPU seconds per second).
    pub(crate) server_cores: f64,
    /// CPU used by the most loaded master process (the leader of a group), in cores.
    pub(crate) busiest_cores: f64,
    /// CPU used by this process (the clients), in cores.
    pub(crate) client_cores: f64,
    /// Time the master threads spent waiting for a CPU, in threads (seconds per second).
    pub(crate) runqueue_threads: f64,
    /// Share of the time the busiest Raft loop thread (the leader's) was on a CPU.
    pub(crate) raft_loop_busy: f64,
    /// Operations that failed.
    pub(crate) errors: u64,
}

/// The summary of several runs of the same measurement: medians of each figure.
#[derive(Clone, Debug, Default)]
pub(crate) struct Summary {
    /// Median operations per second.
    pub(crate) ops_per_sec: f64,
    /// `(max - min) / median` of the runs' operations per second, percent.
    pub(crate) spread_pct: f64,
    /// Median calls per second.
    pub(crate) calls_per_sec: f64,
    /// Median of the runs' p50 latencies, microseconds.
    pub(crate) p50_us: f64,
    /// Median of the runs' p99 latencies, microseconds.
    pub(crate) p99_us: f64,
    /// Median master CPU, cores.
    pub(crate) server_cores: f64,
    /// Median CPU of the busiest master process, cores.
    pub(crate) busiest_cores: f64,
    /// Median client CPU, cores.
    pub(crate) client_cores: f64,
    /// Median run-queue wait of the master threads, threads.
    pub(crate) runqueue_threads: f64,
    /// Median share of time the leader's Raft loop thread was on a CPU.
    pub(crate) raft_loop_busy: f64,
    /// Failed operations over all runs.
    pub(crate) errors: u64,
}

impl Summary {
    /// Summarises `runs`.
    pub(crate) fn of(runs: &[Run]) -> Summary {
        let col = |f: fn(&Run) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
        let ops: Vec<f64> = runs.iter().map(|r| r.ops_per_sec).collect();
        Summary {
            ops_per_sec: median(&ops),
            spread_pct: spread_pct(&ops),
            calls_per_sec: col(|r| r.calls_per_sec),
            p50_us: col(|r| r.p50_us as f64),
            p99_us: col(|r| r.p99_us as f64),
            server_cores: col(|r| r.server_cores),
            busiest_cores: col(|r| r.busiest_cores),
            client_cores: col(|r| r.client_cores),
            runqueue_threads: col(|r| r.runqueue_threads),
            raft_loop_busy: col(|r| r.raft_loop_busy),
            errors: runs.iter().map(|r| r.errors).sum(),
        }
    }
}

/// `a / b`, or 0 when `b` is 0.
pub(crate) fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_spreads() {
        assert_eq!(median(&[]), 0.0);
        assert_eq!(median(&[3.0]), 3.0);
        assert_eq!(median(&[5.0, 1.0, 3.0]), 3.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(spread_pct(&[90.0, 100.0, 110.0]), 20.0);
        assert_eq!(spread_pct(&[0.0, 0.0]), 0.0);
        assert_eq!(ratio(1.0, 0.0), 0.0);
        assert_eq!(ratio(1.0, 4.0), 0.25);
    }

    #[test]
    fn nearest_rank_quantiles() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(quantile(&v, 0.5), 50);
        assert_eq!(quantile(&v, 0.99), 99);
        assert_eq!(quantile(&v, 1.0), 100);
        assert_eq!(quantile(&v, 0.0), 1);
        assert_eq!(quantile(&[], 0.5), 0);
        assert_eq!(quantile(&[7], 0.99), 7);
    }

    #[test]
    fn summaries_take_medians_and_add_errors() {
        let run = |ops: f64, p50: u32, errors: u64| Run {
            ops_per_sec: ops,
            calls_per_sec: ops / 2.0,
            p50_us: p50,
            p99_us: p50 * 3,
            errors,
            ..Run::default()
        };
        let s = Summary::of(&[run(100.0, 10, 0), run(300.0, 30, 1), run(200.0, 20, 2)]);
        assert_eq!(s.ops_per_sec, 200.0);
        assert_eq!(s.calls_per_sec, 100.0);
        assert_eq!(s.p50_us, 20.0);
        assert_eq!(s.p99_us, 60.0);
        assert_eq!(s.spread_pct, 100.0);
        assert_eq!(s.errors, 3);
    }
}
