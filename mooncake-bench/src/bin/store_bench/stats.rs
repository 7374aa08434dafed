//! Measurement: per-call samples, case results, the report table and the target checks.

use std::time::{Duration, Instant};

use crate::util::{fmt_bytes, fmt_ns, fmt_rate};
use crate::{Args, Case};

/// p50 and p99 (nearest rank) of `samples`, sorting them; zeros when empty.
pub(crate) fn percentiles(samples: &mut [u64]) -> (u64, u64) {
    if samples.is_empty() {
        return (0, 0);
    }
    samples.sort_unstable();
    let at = |q: f64| {
        let rank = (q * samples.len() as f64).ceil() as usize;
        samples[rank.clamp(1, samples.len()) - 1]
    };
    (at(0.50), at(0.99))
}

/// Collects the timed calls of one case and decides when it has enough.
pub(crate) struct Meter {
    start: Instant,
    warm_until: Instant,
    timed: Duration,
    min_calls: usize,
    samples: Vec<u64>,
    objects: u64,
    bytes: u64,
    busy: Duration,
    /// No call recorded yet: the first one is part of the warm-up.
    first: bool,
}

/// Calls beyond this end a case whatever the time.
const MAX_CALLS: usize = 2_000_000;

impl Meter {
    pub(crate) fn new(args: &Args) -> Meter {
        let start = Instant::now();
        let warm = Duration::from_secs_f64((args.seconds / 10.0).clamp(0.01, 0.1));
        Meter {
            start,
            warm_until: start + warm,
            timed: Duration::from_secs_f64(args.seconds),
            min_calls: args.min_calls,
            samples: Vec::new(),
            objects: 0,
            bytes: 0,
            busy: Duration::ZERO,
            first: true,
        }
    }

    /// Records one call of `took` that moved `objects` objects of `bytes` bytes in total; the
    /// first call (which pays the page faults of memory the case touches first) and calls that
    /// end during the warm-up are not counted.
    pub(crate) fn record(&mut self, took: Duration, objects: u64, bytes: u64) {
        if std::mem::take(&mut self.first) || Instant::now() < self.warm_until {
            return;
        }
        self.samples.push(took.as_nanos() as u64);
        self.objects += objects;
        self.bytes += bytes;
        self.busy += took;
    }

    /// Whether the case has run long enough.
    pub(crate) fn done(&self) -> bool {
        let wall = self.start.elapsed();
        let n = self.samples.len();
        (self.busy >= self.timed && n >= self.min_calls)
            || n >= MAX_CALLS
            || (wall >= self.timed * 20 && n >= 1)
    }

    pub(crate) fn finish(mut self, case: Case, size: u64, batch: usize) -> CaseResult {
        let (p50, p99) = percentiles(&mut self.samples);
        CaseResult {
            case,
            size,
            batch,
            calls: self.samples.len() as u64,
            objects: self.objects,
            bytes: self.bytes,
            busy: self.busy,
            p50,
            p99,
        }
    }
}

/// What one case measured.
#[derive(Clone, Debug)]
pub(crate) struct CaseResult {
    pub(crate) case: Case,
    pub(crate) size: u64,
    pub(crate) batch: usize,
    pub(crate) calls: u64,
    pub(crate) objects: u64,
    pub(crate) bytes: u64,
    pub(crate) busy: Duration,
    /// Per call, ns.
    pub(crate) p50: u64,
    pub(crate) p99: u64,
}

impl CaseResult {
    pub(crate) fn calls_per_s(&self) -> f64 {
        self.calls as f64 / self.busy.as_secs_f64().max(1e-9)
    }
    pub(crate) fn objects_per_s(&self) -> f64 {
        self.objects as f64 / self.busy.as_secs_f64().max(1e-9)
    }
    pub(crate) fn gb_per_s(&self) -> f64 {
        self.bytes as f64 / self.busy.as_secs_f64().max(1e-9) / 1e9
    }
}

pub(crate) fn print_header(size: u64, batch: usize) {
    println!();
    println!("== {} objects, batch {batch} ==", fmt_bytes(size));
    println!(
        "{:<16} {:>8} {:>9} {:>10} {:>7} {:>9} {:>9}",
        "case", "calls", "calls/s", "objects/s", "GB/s", "p50/call", "p99/call"
    );
}

pub(crate) fn print_row(r: &CaseResult) {
    println!(
        "{:<16} {:>8} {:>9} {:>10} {:>7.3} {:>9} {:>9}",
        r.case.name(),
        r.calls,
        fmt_rate(r.calls_per_s()),
        fmt_rate(r.objects_per_s()),
        r.gb_per_s(),
        fmt_ns(r.p50),
        fmt_ns(r.p99),
    );
}

/// One target check.
pub(crate) struct Check {
    pub(crate) pass: bool,
    pub(crate) text: String,
}

fn find(rows: &[CaseResult], case: Case, size: u64) -> Option<&CaseResult> {
    rows.iter().find(|r| r.case == case && r.size == size)
}

/// Evaluates the targets against this run's rows, its interleaved (store, raw engine) pairs and
/// the ping-pong p50 (ns).
pub(crate) fn evaluate(
    rows: &[CaseResult],
    paired: &[(CaseResult, CaseResult)],
    ping_p50: u64,
) -> Vec<Check> {
    let mut out = Vec::new();
    let small = 4 << 10;
    let ping = ping_p50 as f64;
    for (case, factor) in [
        (Case::Get, 3.0),
        (Case::Put, 5.0),
        (Case::GetInto, 3.0),
        (Case::PutFrom, 5.0),
        (Case::GetCold, 3.0),
        (Case::GetIntoCold, 3.0),
    ] {
        if let Some(r) = find(rows, case, small) {
            let limit = factor * ping;
            let extra = match case {
                Case::GetInto | Case::PutFrom => " (zero-copy form, same bound)",
                Case::GetCold => " (location cache off, same bound)",
                Case::GetIntoCold => " (zero-copy, location cache off, same bound)",
                _ => "",
            };
            out.push(Check {
                pass: (r.p50 as f64) <= limit,
                text: format!(
                    "4 KiB {} p50 {} <= {factor:.0}x ping p50 = {} (ratio {:.2}x){extra}",
                    case.name(),
                    fmt_ns(r.p50),
                    fmt_ns(limit as u64),
                    r.p50 as f64 / ping.max(1.0),
                ),
            });
        }
    }
    for case in [
        Case::PutBatch,
        Case::GetBatch,
        Case::BatchPutFrom,
        Case::BatchGetInto,
        Case::GetBatchCold,
        Case::BatchGetIntoCold,
    ] {
        if let Some(r) = find(rows, case, small) {
            out.push(Check {
                pass: r.objects_per_s() >= 100_000.0,
                text: format!(
                    "4 KiB {} x{}: {} objects/s >= 100k",
                    case.name(),
                    r.batch,
                    fmt_rate(r.objects_per_s())
                ),
            });
        }
    }
    let mut big: Vec<u64> = rows
        .iter()
        .map(|r| r.size)
        .filter(|&s| s >= 1 << 20)
        .collect();
    big.sort_unstable();
    big.dedup();
    for size in big {
        for (case, te) in [
            (Case::GetInto, Case::TeRead),
            (Case::PutFrom, Case::TeWrite),
            (Case::BatchGetInto, Case::TeReadBatch),
            (Case::BatchPutFrom, Case::TeWriteBatch),
        ] {
            if let (Some(r), Some(t)) = (find(rows, case, size), find(rows, te, size)) {
                let ratio = r.gb_per_s() / t.gb_per_s().max(1e-12);
                out.push(Check {
                    pass: ratio >= 0.8,
                    text: format!(
                        "{} {}: {:.2} GB/s >= 0.8x {} {:.2} GB/s (ratio {ratio:.2})",
                        fmt_bytes(size),
                        case.name(),
                        r.gb_per_s(),
                        te.name(),
                        t.gb_per_s(),
                    ),
                });
            }
        }
    }
    // The same comparison with the calls alternated: the raw engine's own figure swings from
    // run to run here, and this compares the two under the same conditions.
    for (store, raw) in paired {
        let ratio = raw.p50 as f64 / (store.p50 as f64).max(1.0);
        out.push(Check {
            pass: ratio >= 0.8,
            text: format!(
                "{} {} interleaved with {}: p50 {} vs {} = {ratio:.2}x the raw engine's \
                 throughput per call (>= 0.8x)",
                fmt_bytes(store.size),
                store.case.name(),
                raw.case.name(),
                fmt_ns(store.p50),
                fmt_ns(raw.p50),
            ),
        });
    }
    out
}
