//! `veer_log_lines_dropped_total`: log lines dropped because the queue to
//! the thread that writes them to stderr was full (see the binary's
//! `init_logs`), and access log lines dropped because too many waited for
//! stderr ([`crate::access`]). The counts live with the writers; this
//! reads them at each scrape.

use std::sync::OnceLock;

use prometheus::core::{Collector, Desc};
use prometheus::proto::{Counter, Metric, MetricFamily, MetricType};
use tracing_appender::non_blocking::ErrorCounter;

const NAME: &str = "veer_log_lines_dropped_total";
const HELP: &str = "Log lines dropped because stderr's reader fell behind: 16 384 lines queued, or 4 MiB of access log lines (requests never wait for the log).";

static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// Exports `counter` (the log writer's) from now on; only the first call
/// counts.
pub fn count(counter: ErrorCounter) {
    let _ = DROPPED.set(counter);
}

/// The collector (0 until [`count`] is called).
pub struct LogDrops {
    desc: Desc,
}

impl LogDrops {
    /// Creates it.
    pub fn new() -> Result<LogDrops, prometheus::Error> {
        Ok(LogDrops {
            desc: Desc::new(NAME.into(), HELP.into(), Vec::new(), Default::default())?,
        })
    }
}

impl Collector for LogDrops {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut counter = Counter::default();
        let queued = DROPPED.get().map_or(0, ErrorCounter::dropped_lines) as u64;
        counter.set_value((queued + crate::access::dropped()) as f64);
        let mut m = Metric::default();
        m.set_counter(counter);
        let mut family = MetricFamily::default();
        family.set_name(NAME.into());
        family.set_help(HELP.into());
        family.set_field_type(MetricType::COUNTER);
        family.set_metric(vec![m]);
        vec![family]
    }
}
