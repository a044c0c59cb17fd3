//! Actual usage from the node's cgroup v2 tree.
//!
//! A pod's cgroup lives at one of these places, depending on the kubelet's cgroup
//! driver and the pod's QoS class (uid dashes become underscores under systemd):
//! - systemd:  `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid>.slice`,
//!   Guaranteed pods directly at `kubepods.slice/kubepods-pod<uid>.slice`;
//! - cgroupfs: `kubepods/<qos>/pod<uid>`, Guaranteed pods at `kubepods/pod<uid>`.
//!
//! Read: `cpu.stat` `usage_usec` (cumulative), `memory.current`, and `memory.peak`
//! where the kernel has it (5.19+). Nodes with cgroup v1 have none of these files and
//! produce no usage fields.
use std::path::{Path, PathBuf};

/// One reading of a pod's cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupSample {
    /// Cumulative CPU time in microseconds.
    pub usage_usec: u64,
    /// Memory in use, bytes.
    pub memory_current: u64,
    /// Highest memory use since the cgroup was created, bytes (kernel 5.19+).
    pub memory_peak: Option<u64>,
}

/// The candidate directories of a pod's cgroup, most likely first.
pub fn candidates(root: &Path, uid: &str, qos: Option<&str>) -> Vec<PathBuf> {
    let under = uid.replace('-', "_");
    let mut classes = vec!["burstable", "besteffort", "guaranteed"];
    if let Some(q) = qos.map(str::to_ascii_lowercase)
        && let Some(i) = classes.iter().position(|c| *c == q)
    {
        classes.swap(0, i);
    }
    let mut out = Vec::new();
    for class in classes {
        if class == "guaranteed" {
            out.push(root.join(format!("kubepods.slice/kubepods-pod{under}.slice")));
            out.push(root.join(format!("kubepods/pod{uid}")));
        } else {
            out.push(root.join(format!(
                "kubepods.slice/kubepods-{class}.slice/kubepods-{class}-pod{under}.slice"
            )));
            out.push(root.join(format!("kubepods/{class}/pod{uid}")));
        }
    }
    out
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Reads the pod's cgroup, if it exists under `root`.
pub fn read(root: &Path, uid: &str, qos: Option<&str>) -> Option<CgroupSample> {
    candidates(root, uid, qos).into_iter().find_map(|dir| {
        let stat = std::fs::read_to_string(dir.join("cpu.stat")).ok()?;
        let usage_usec = stat
            .lines()
            .find_map(|l| l.strip_prefix("usage_usec "))
            .and_then(|v| v.trim().parse().ok())?;
        Some(CgroupSample {
            usage_usec,
            memory_current: read_u64(&dir.join("memory.current"))?,
            memory_peak: read_u64(&dir.join("memory.peak")),
        })
    })
}
