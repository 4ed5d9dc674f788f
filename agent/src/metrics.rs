//! Health metrics read from Linux's /proc and statvfs: cheap reads, no subprocesses.

use std::collections::HashSet;
use std::path::Path;

use shared::protocol::{DiskUsage, Metrics};

/// At most this many filesystems are reported, so a heartbeat stays small.
const MAX_DISKS: usize = 32;

/// Keeps the previous CPU counters, since CPU % is a rate between two samples.
#[derive(Debug, Default)]
pub struct Collector {
    last_cpu: Option<(u64, u64)>,
}

impl Collector {
    pub fn new() -> Self {
        Collector { last_cpu: cpu_counters() }
    }

    pub fn collect(&mut self) -> Metrics {
        let uname = rustix::system::uname();
        let (mem_total, mem_available) = meminfo();
        let cpu = cpu_counters();
        let cpu_percent = match (self.last_cpu, cpu) {
            (Some((busy0, total0)), Some((busy1, total1))) if total1 > total0 => {
                (busy1.saturating_sub(busy0) as f64 / (total1 - total0) as f64 * 100.0).clamp(0.0, 100.0)
            }
            _ => 0.0,
        };
        if cpu.is_some() {
            self.last_cpu = cpu;
        }
        Metrics {
            hostname: uname.nodename().to_string_lossy().into_owned(),
            os: os_release(),
            kernel: uname.release().to_string_lossy().into_owned(),
            arch: std::env::consts::ARCH.to_owned(),
            agent_version: shared::VERSION.to_owned(),
            uptime_secs: read("/proc/uptime").and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok()).map_or(0, |u| u as u64),
            load_avg: loadavg(),
            cpu_percent: (cpu_percent * 10.0).round() / 10.0,
            mem_used_bytes: mem_total.saturating_sub(mem_available),
            mem_total_bytes: mem_total,
            disks: disks(),
            process_count: process_count(),
        }
    }
}

pub fn hostname() -> String {
    rustix::system::uname().nodename().to_string_lossy().into_owned()
}

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

fn os_release() -> String {
    let text = read("/etc/os-release").or_else(|| read("/usr/lib/os-release")).unwrap_or_default();
    text.lines().find_map(|l| l.strip_prefix("PRETTY_NAME=")).map(|v| v.trim_matches('"').to_owned()).unwrap_or_else(|| "Linux".to_owned())
}

fn loadavg() -> [f64; 3] {
    let text = read("/proc/loadavg").unwrap_or_default();
    let mut it = text.split_whitespace().map(|v| v.parse::<f64>().unwrap_or(0.0));
    [it.next().unwrap_or(0.0), it.next().unwrap_or(0.0), it.next().unwrap_or(0.0)]
}

/// (busy, total) jiffies over all CPUs.
fn cpu_counters() -> Option<(u64, u64)> {
    let text = read("/proc/stat")?;
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    if v.len() < 4 {
        return None;
    }
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let total: u64 = v.iter().take(8).sum();
    let idle = v[3] + v.get(4).copied().unwrap_or(0);
    Some((total.saturating_sub(idle), total))
}

/// (total, available) bytes.
fn meminfo() -> (u64, u64) {
    let text = read("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

fn process_count() -> u64 {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(Result::ok).filter(|e| e.file_name().to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))).count()
                as u64
        })
        .unwrap_or(0)
}

/// Local filesystems backed by a device, one entry per device (bind mounts are skipped).
fn disks() -> Vec<DiskUsage> {
    let mounts = read("/proc/self/mounts").unwrap_or_default();
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for line in mounts.lines() {
        let mut f = line.split_whitespace();
        let (Some(device), Some(mount), Some(fs_type)) = (f.next(), f.next(), f.next()) else { continue };
        let real = device.starts_with('/') || matches!(fs_type, "zfs" | "btrfs");
        if !real || matches!(fs_type, "squashfs" | "iso9660" | "nfs" | "nfs4" | "cifs" | "fuse.sshfs") || !seen.insert(device.to_owned()) {
            continue;
        }
        // /proc/mounts escapes spaces and the like as octal.
        let mount = mount.replace("\\040", " ").replace("\\011", "\t");
        let Ok(st) = rustix::fs::statvfs(Path::new(&mount)) else { continue };
        let total = st.f_blocks.saturating_mul(st.f_frsize);
        if total == 0 {
            continue;
        }
        let free = st.f_bfree.saturating_mul(st.f_frsize);
        out.push(DiskUsage { mount, fs_type: fs_type.to_owned(), used_bytes: total.saturating_sub(free), total_bytes: total });
        if out.len() == MAX_DISKS {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_of_this_machine_are_plausible() {
        let mut c = Collector::new();
        // Burn a little CPU so that the rate has something to measure.
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        assert!(x > 0);
        let m = c.collect();
        assert!(!m.hostname.is_empty());
        assert!(m.mem_total_bytes > 0 && m.mem_used_bytes <= m.mem_total_bytes);
        assert!(m.process_count > 0);
        assert!((0.0..=100.0).contains(&m.cpu_percent));
        assert!(m.uptime_secs > 0);
        assert!(!m.disks.is_empty(), "at least the root filesystem");
        assert!(m.disks.iter().all(|d| d.used_bytes <= d.total_bytes));
    }
}
