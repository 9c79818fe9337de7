//! Host metrics from sysinfo. The `System` is kept between reads so CPU usage is a real delta
//! and only the parts we report are refreshed. Where the platform gives no figure, it reads 0.

use rewind_proto::v1::HostMetrics;
use sysinfo::{CpuRefreshKind, Disks, MemoryRefreshKind, RefreshKind, System};

pub struct MetricsReader {
    system: Option<System>,
    disks: Option<Disks>,
}

impl Default for MetricsReader {
    fn default() -> Self {
        let refresh = RefreshKind::nothing()
            .with_cpu(CpuRefreshKind::nothing().with_usage())
            .with_memory(MemoryRefreshKind::nothing().with_ram());
        Self {
            system: System::new_with_specifics(refresh).ok(),
            disks: Disks::new_with_refreshed_list().ok(),
        }
    }
}

impl MetricsReader {
    pub fn read(&mut self) -> HostMetrics {
        let mut metrics = HostMetrics {
            load_average_1m: System::load_average().map(|load| load.one).unwrap_or(0.0),
            ..HostMetrics::default()
        };
        if let Some(system) = self.system.as_mut() {
            system.refresh_cpu_usage();
            system.refresh_memory();
            metrics.cpu_percent = system.global_cpu_usage();
            metrics.memory_used_bytes = system.used_memory();
            metrics.memory_total_bytes = system.total_memory();
        }
        if let Some(disks) = self.disks.as_mut() {
            disks.refresh(true);
            for disk in disks.iter() {
                metrics.disk_used_bytes +=
                    disk.total_space().saturating_sub(disk.available_space());
                metrics.disk_total_bytes += disk.total_space();
            }
        }
        metrics
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_plausible() {
        let metrics = MetricsReader::default().read();
        assert!(metrics.memory_total_bytes > 0);
        assert!(metrics.memory_used_bytes <= metrics.memory_total_bytes);
        assert!(metrics.disk_used_bytes <= metrics.disk_total_bytes);
    }
}
