//! `podRuntime`: exact running time of pods, per aligned window.
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{PodSelector, SpecError, spec_error};

/// Measures how long selected pods ran on this node, one event per pod and aligned
/// window in which it ran (`duration_seconds`), with the pod's effective requests and
/// limits, derived request-seconds and, where the node exposes cgroup v2, actual usage.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodRuntimeSource {
    /// Which pods are measured. Default: every pod of the Collector's namespace.
    #[serde(default)]
    pub pods: PodSelector,

    /// Window length in seconds; windows are aligned to the Unix epoch. Default 60.
    #[serde(default = "default_window_secs")]
    #[schemars(range(min = 1, max = 86400))]
    pub window_secs: u32,

    /// How long after a window ends it is closed and sent, so the kubelet's status
    /// updates (a container that finished near the window's end) have arrived.
    /// Default 15.
    #[serde(default = "default_settle_secs")]
    #[schemars(range(min = 0, max = 3600))]
    pub settle_secs: u32,

    /// Pod label whose value is the subject when the pod has neither the
    /// `tally.dev/subject` nor the `openmeter.io/subject` annotation. Without it (or
    /// when the pod lacks the label) the subject is the pod's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject_label: Option<String>,

    /// Pod labels copied into the event's `data` (under `label_<name>` with
    /// non-alphanumerics replaced by `_`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("maxItems" = 32))]
    pub labels: Vec<String>,

    /// Actual usage from cgroup v2.
    #[serde(default)]
    pub cgroup: CgroupOptions,

    /// Extended resources counted as one whole accelerator per unit, besides NVIDIA's
    /// (read with their sharing: MIG, time-slicing, MPS, HAMi; see the README's
    /// "Billing GPUs"). Default: `amd.com/gpu`, `gpu.intel.com/i915`,
    /// `gpu.intel.com/xe`, `google.com/tpu`, `aws.amazon.com/neuron`. Shares of a
    /// device (e.g. `gpu.intel.com/millicores`) are refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("maxItems" = 32))]
    pub whole_device_resources: Vec<String>,
}

/// Extended resources that are shares of a device, never whole devices.
const DEVICE_SHARES: &[&str] = &[
    "gpu.intel.com/millicores",
    "gpu.intel.com/memory.max",
    "gpu.intel.com/tiles",
    "aws.amazon.com/neuroncore",
];

/// Reading actual usage from the node's cgroup v2 tree.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CgroupOptions {
    /// Whether to read `cpu.stat`, `memory.current` and `memory.peak`. Default true;
    /// silently skipped on nodes without cgroup v2.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Where the agent sees the node's `/sys/fs/cgroup` (a read-only hostPath).
    #[serde(default = "default_cgroup_root")]
    pub root: String,
}

impl Default for CgroupOptions {
    fn default() -> Self {
        CgroupOptions {
            enabled: true,
            root: default_cgroup_root(),
        }
    }
}

fn default_window_secs() -> u32 {
    60
}

fn default_settle_secs() -> u32 {
    15
}

fn yes() -> bool {
    true
}

fn default_cgroup_root() -> String {
    "/sys/fs/cgroup".into()
}

impl PodRuntimeSource {
    pub(crate) fn validate(&self) -> Result<(), SpecError> {
        if self.window_secs == 0 || 86400 % self.window_secs != 0 {
            return Err(spec_error(
                "spec.podRuntime.windowSecs",
                "must divide a day evenly (e.g. 60, 300, 3600) so windows align across days",
            ));
        }
        for (i, name) in self.whole_device_resources.iter().enumerate() {
            let field = format!("spec.podRuntime.wholeDeviceResources[{i}]");
            if !name.contains('/') {
                return Err(spec_error(
                    &field,
                    format!(
                        "{name:?} is not an extended resource name (vendor/name, e.g. amd.com/gpu)"
                    ),
                ));
            }
            if name.starts_with("nvidia.com/") {
                return Err(spec_error(
                    &field,
                    format!(
                        "{name:?}: NVIDIA resources are read with their sharing (MIG, time-slicing, MPS, HAMi); leave them out"
                    ),
                ));
            }
            if DEVICE_SHARES.contains(&name.as_str()) {
                return Err(spec_error(
                    &field,
                    format!("{name:?} is a share of a device, not a whole device"),
                ));
            }
        }
        Ok(())
    }
}
