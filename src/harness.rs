//! Roles run and measured from outside, for the reliability suite, the
//! benchmarks and the tests: a process of the real binary watched through
//! its logs and killed for real ([`Process`]), a registered service on a
//! runtime of its own that dies like a crashed process ([`Isolated`]),
//! real etcd clusters for the etcd store ([`EtcdCluster`]), an OTLP
//! collector that keeps the spans sent to it ([`Collector`]), and what
//! /proc says of a process's CPU and memory.

mod etcd;
mod isolated;
mod otlp;
mod process;

pub use etcd::{EtcdCluster, etcd_binary};
pub use isolated::Isolated;
pub use otlp::{CollectedSpan, Collector};
pub use process::{Process, cpu_time, rss_bytes};
