//! Liveness and health: the agent's periodic `heartbeat` and the metrics it carries.

use serde::{Deserialize, Serialize};

/// Sent by the agent every heartbeat interval (with jitter) once the session is open.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Counts up from 1 within one agent process; a reset means the agent restarted.
    pub seq: u64,
    pub metrics: Metrics,
}

/// A snapshot of the terminal's health.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    pub hostname: String,
    /// Distribution and release, from os-release: `Debian GNU/Linux 12 (bookworm)`.
    pub os: String,
    pub kernel: String,
    pub arch: String,
    pub agent_version: String,
    pub uptime_secs: u64,
    /// 1, 5 and 15 minute load averages.
    pub load_avg: [f64; 3],
    /// CPU busy across all cores since the previous heartbeat, 0 to 100.
    pub cpu_percent: f64,
    pub mem_used_bytes: u64,
    pub mem_total_bytes: u64,
    /// One entry per mounted local filesystem.
    #[serde(default)]
    pub disks: Vec<DiskUsage>,
    pub process_count: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DiskUsage {
    pub mount: String,
    pub fs_type: String,
    pub used_bytes: u64,
    pub total_bytes: u64,
}

impl Metrics {
    /// Used and total bytes over every reported filesystem.
    pub fn disk_totals(&self) -> (u64, u64) {
        self.disks.iter().fold((0, 0), |(u, t), d| (u + d.used_bytes, t + d.total_bytes))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::AgentMessage;
    use super::super::tests::round_trip;
    use super::*;

    pub(crate) fn sample_metrics() -> Metrics {
        Metrics {
            hostname: "pos-0042".into(),
            os: "Debian GNU/Linux 12 (bookworm)".into(),
            kernel: "6.1.0-18-amd64".into(),
            arch: "x86_64".into(),
            agent_version: "0.1.0".into(),
            uptime_secs: 86_400,
            load_avg: [0.25, 0.5, 0.75],
            cpu_percent: 12.5,
            mem_used_bytes: 1 << 30,
            mem_total_bytes: 4 << 30,
            disks: vec![DiskUsage { mount: "/".into(), fs_type: "ext4".into(), used_bytes: 10 << 30, total_bytes: 64 << 30 }],
            process_count: 142,
        }
    }

    #[test]
    fn heartbeat_round_trips() {
        round_trip(&AgentMessage::Heartbeat(Heartbeat { seq: 42, metrics: sample_metrics() }), "heartbeat");
    }

    #[test]
    fn a_heartbeat_decodes_to_the_same_floats_after_a_round_trip() {
        // From fuzz/protocol_decode. Without serde_json's float_roundtrip, this parsed one ULP
        // above the nearest f64 (4.0000000000000004e-19), and that text parsed one ULP below it.
        let json = r#"{"type":"heartbeat","seq":1,"metrics":{"hostname":"h","os":"","kernel":"","arch":"","agent_version":"",
            "uptime_secs":0,"load_avg":[0.00000000000000000040000000000000000000000010632498320263144333,0.5,0.75],"cpu_percent":12.5,
            "mem_used_bytes":0,"mem_total_bytes":0,"process_count":0}}"#;
        let msg = AgentMessage::decode(json).unwrap();
        let AgentMessage::Heartbeat(h) = &msg else { panic!("{msg:?}") };
        assert_eq!(h.metrics.load_avg[0], 4e-19);
        round_trip(&msg, "heartbeat");
    }

    #[test]
    fn disk_totals_sum_every_filesystem() {
        let mut m = sample_metrics();
        m.disks.push(DiskUsage { mount: "/data".into(), fs_type: "xfs".into(), used_bytes: 1, total_bytes: 2 });
        assert_eq!(m.disk_totals(), ((10 << 30) + 1, (64 << 30) + 2));
    }
}
