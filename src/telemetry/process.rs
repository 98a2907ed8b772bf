//! The process's own figures under their standard names (`process_*`, as
//! every Prometheus client writes them: CPU, memory, file descriptors,
//! threads, start time), read from `/proc` at each scrape, and the tokio
//! runtime's (`tokio_*`) that tokio reports without unstable features.
//! Off Linux, or where `/proc` cannot be read, the process figures are
//! left out rather than guessed.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Unit;

/// Reads the process and its runtime at each scrape.
#[derive(Debug, Default)]
pub struct Process;

impl Collector for Process {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some(stat) = Stat::read() {
            counter(
                &mut encoder,
                "process_cpu",
                "User and system CPU time spent",
                Some(&Unit::Seconds),
                stat.cpu_seconds,
            )?;
            gauge(
                &mut encoder,
                "process_resident_memory_bytes",
                "Resident memory size",
                stat.resident_bytes as f64,
            )?;
            gauge(
                &mut encoder,
                "process_virtual_memory_bytes",
                "Virtual memory size",
                stat.virtual_bytes as f64,
            )?;
            gauge(
                &mut encoder,
                "process_threads",
                "Threads of the process",
                stat.threads as f64,
            )?;
            if let Some(start) = stat.start_time_seconds {
                gauge(
                    &mut encoder,
                    "process_start_time_seconds",
                    "Start time of the process since the Unix epoch",
                    start,
                )?;
            }
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            gauge(
                &mut encoder,
                "process_open_fds",
                "Open file descriptors",
                fds.count() as f64,
            )?;
        }
        if let Ok((soft, _)) =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        {
            gauge(
                &mut encoder,
                "process_max_fds",
                "The limit on open file descriptors",
                soft as f64,
            )?;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let metrics = runtime.metrics();
            let workers = metrics.num_workers();
            let busy: f64 = (0..workers)
                .map(|i| metrics.worker_total_busy_duration(i).as_secs_f64())
                .sum();
            let parks: u64 = (0..workers).map(|i| metrics.worker_park_count(i)).sum();
            gauge(
                &mut encoder,
                "tokio_workers",
                "Worker threads of the tokio runtime",
                workers as f64,
            )?;
            gauge(
                &mut encoder,
                "tokio_alive_tasks",
                "Tasks alive on the tokio runtime",
                metrics.num_alive_tasks() as f64,
            )?;
            gauge(
                &mut encoder,
                "tokio_global_queue_depth",
                "Tasks waiting in the runtime's global queue",
                metrics.global_queue_depth() as f64,
            )?;
            counter(
                &mut encoder,
                "tokio_worker_busy",
                "Time the runtime's workers spent running tasks, summed over workers",
                Some(&Unit::Seconds),
                busy,
            )?;
            counter(
                &mut encoder,
                "tokio_worker_parks",
                "Times the runtime's workers parked (found nothing to do), summed over workers",
                None,
                parks as f64,
            )?;
        }
        Ok(())
    }
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: f64,
) -> Result<(), std::fmt::Error> {
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: f64,
) -> Result<(), std::fmt::Error> {
    let metric = ConstCounter::new(value);
    metric.encode(encoder.encode_descriptor(name, help, unit, metric.metric_type())?)
}

/// What `/proc/self/stat` says of the process.
struct Stat {
    cpu_seconds: f64,
    resident_bytes: u64,
    virtual_bytes: u64,
    threads: u64,
    start_time_seconds: Option<f64>,
}

/// Clock ticks per second in `/proc`'s figures (`USER_HZ`, fixed at 100
/// in Linux's user-space ABI).
const TICKS_PER_SECOND: f64 = 100.0;

impl Stat {
    fn read() -> Option<Self> {
        let text = std::fs::read_to_string("/proc/self/stat").ok()?;
        // The command name (field 2) is in parentheses and may hold
        // spaces; the fields that follow start at field 3.
        let rest = &text[text.rfind(')')? + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
        let page = page_size()?;
        let started_ticks = field(22)?;
        Some(Self {
            cpu_seconds: (field(14)? + field(15)?) as f64 / TICKS_PER_SECOND,
            threads: field(20)?,
            virtual_bytes: field(23)?,
            resident_bytes: field(24)? * page,
            start_time_seconds: boot_time()
                .map(|boot| boot as f64 + started_ticks as f64 / TICKS_PER_SECOND),
        })
    }
}

fn page_size() -> Option<u64> {
    let size = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok()??;
    u64::try_from(size).ok()
}

/// When the machine booted, in seconds since the Unix epoch.
fn boot_time() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_os = "linux")]
    fn the_process_reads_itself() {
        let stat = Stat::read().expect("/proc/self/stat reads");
        assert!(stat.threads >= 1);
        assert!(stat.resident_bytes > 1024 * 1024, "{}", stat.resident_bytes);
        assert!(stat.virtual_bytes >= stat.resident_bytes);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let started = stat.start_time_seconds.expect("a start time");
        assert!(started <= now + 1.0 && started > now - 86_400.0 * 365.0);
    }
}
