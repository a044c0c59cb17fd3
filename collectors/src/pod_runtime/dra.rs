//! Accelerators allocated through Dynamic Resource Allocation (`resource.k8s.io/v1`).
//!
//! A pod names its claims in `spec.resourceClaims` (a claim by name, or a template
//! whose generated claim is named in `status.resourceClaimStatuses`). A claim's
//! `status.allocation.devices.results` name each device by driver, pool and device;
//! the driver's ResourceSlices describe it (attributes, capacity). Claims are
//! deallocated once their pods end, so the agent resolves them **while the pod runs**
//! and keeps the result in the pod's checkpoint ([`ClaimDevices`]).
//!
//! Which devices are accelerators: those of drivers named `gpu.*` (NVIDIA's
//! `gpu.nvidia.com`, Intel's `gpu.intel.com`, AMD's `gpu.amd.com`) and any device
//! whose `type` attribute is `gpu` or `mig`. A device is one GPU, or for a MIG device
//! (`type: mig`, NVIDIA's driver) its `profile`'s share of its `productName`, by the
//! same rule as MIG extended resources ([`super::accelerators`]); memory is its
//! `memory` capacity.
//!
//! **A claim shared by several pods** (`status.reservedFor` lists them; they all run on
//! the claim's node) is split by the time each ran: in every second, the devices are
//! divided equally among the sharing pods running in that second. Pods of the claim
//! this agent does not measure (another Collector's selector) still take their part;
//! a second in which only one pod runs is all that pod's.
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::resource::v1::{Device as SliceDevice, ResourceClaim, ResourceSlice};
use serde::{Deserialize, Serialize};

use super::accelerators::mig_share;
use super::resources::parse_quantity;

/// One allocated device, priced.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClaimDevice {
    /// `driver/pool/device`.
    pub name: String,
    /// `gpu` or `mig` (or the driver's own `type`).
    pub kind: String,
    /// `productName`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product: Option<String>,
    /// MIG profile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// Whole-GPU equivalents (`None`: unknown, see `unknown`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<f64>,
    /// Memory, MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<f64>,
    /// Why `gpus` is unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unknown: Option<String>,
}

/// The accelerators of one claim a pod uses.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClaimDevices {
    /// The ResourceClaim's name.
    pub claim: String,
    /// Its uid (pods sharing a claim share it).
    pub uid: String,
    /// Accelerator devices allocated to it.
    pub devices: Vec<ClaimDevice>,
    /// Uids of the pods it is reserved for.
    pub sharers: Vec<String>,
}

impl ClaimDevices {
    /// Whole-GPU equivalents of the claim (`None` when a device's is unknown).
    pub fn gpus(&self) -> Option<f64> {
        self.devices.iter().map(|d| d.gpus).sum()
    }

    /// Memory of the claim's devices, MiB, when every device states it.
    pub fn memory_mib(&self) -> Option<f64> {
        self.devices.iter().map(|d| d.memory_mib).sum()
    }
}

/// The names of the ResourceClaims `pod` uses (template claims once generated).
/// `Err` names a template claim not yet generated.
pub fn claim_names(pod: &Pod) -> Result<Vec<String>, String> {
    let claims = pod
        .spec
        .as_ref()
        .and_then(|s| s.resource_claims.as_ref())
        .into_iter()
        .flatten();
    let statuses: BTreeMap<&str, Option<&String>> = pod
        .status
        .as_ref()
        .and_then(|s| s.resource_claim_statuses.as_ref())
        .into_iter()
        .flatten()
        .map(|s| (s.name.as_str(), s.resource_claim_name.as_ref()))
        .collect();
    let mut out = Vec::new();
    for c in claims {
        match (&c.resource_claim_name, statuses.get(c.name.as_str())) {
            (Some(n), _) => out.push(n.clone()),
            (None, Some(Some(n))) => out.push((*n).clone()),
            // a template claim the pod does not need (status says none)
            (None, Some(None)) => {}
            (None, None) => {
                return Err(format!(
                    "the claim of pod claim {:?} is not generated yet",
                    c.name
                ));
            }
        }
    }
    Ok(out)
}

fn attribute(d: &SliceDevice, driver: &str, key: &str) -> Option<String> {
    let attrs = d.attributes.as_ref()?;
    let a = attrs
        .get(key)
        .or_else(|| attrs.get(&format!("{driver}/{key}")))?;
    a.string
        .clone()
        .or_else(|| a.version.clone())
        .or_else(|| a.int.map(|i| i.to_string()))
        .or_else(|| a.bool.map(|b| b.to_string()))
}

fn price(driver: &str, pool: &str, d: &SliceDevice) -> Option<ClaimDevice> {
    let kind = attribute(d, driver, "type").unwrap_or_default();
    let accelerator = driver.starts_with("gpu.") || kind == "gpu" || kind == "mig";
    if !accelerator {
        return None;
    }
    let product = attribute(d, driver, "productName");
    let memory_mib = d
        .capacity
        .as_ref()
        .and_then(|c| {
            c.get("memory")
                .or_else(|| c.get(&format!("{driver}/memory")))
        })
        .and_then(|q| parse_quantity(&q.value.0))
        .map(|bytes| bytes / (1024.0 * 1024.0));
    let mut out = ClaimDevice {
        name: format!("{driver}/{pool}/{}", d.name),
        kind: if kind.is_empty() {
            "gpu".into()
        } else {
            kind.clone()
        },
        product: product.clone(),
        profile: None,
        gpus: Some(1.0),
        memory_mib,
        unknown: None,
    };
    if kind == "mig" {
        let profile = attribute(d, driver, "profile");
        out.profile = profile.clone();
        let share = match profile.as_deref() {
            Some(p) => mig_share(p, product.as_deref()),
            None => Err("no profile attribute".to_string()),
        };
        match share {
            Ok(s) => out.gpus = Some(s),
            Err(why) => {
                out.gpus = None;
                out.unknown = Some(format!(
                    "DRA MIG device {} (profile {:?}, product {:?}): its share of the GPU is unknown ({why})",
                    out.name, profile, product
                ));
            }
        }
    }
    Some(out)
}

/// The accelerators of `claim`, from the `slices` of its node. `Err` says why it
/// cannot be resolved yet (not allocated, or a device not in any slice).
pub fn resolve(claim: &ResourceClaim, slices: &[ResourceSlice]) -> Result<ClaimDevices, String> {
    let name = claim.metadata.name.clone().unwrap_or_default();
    let status = claim.status.as_ref();
    let results = status
        .and_then(|s| s.allocation.as_ref())
        .and_then(|a| a.devices.as_ref())
        .and_then(|d| d.results.as_ref())
        .ok_or_else(|| format!("ResourceClaim {name} is not allocated"))?;
    let mut devices = Vec::new();
    for r in results {
        let found = slices
            .iter()
            .filter(|s| s.spec.driver == r.driver && s.spec.pool.name == r.pool)
            .flat_map(|s| s.spec.devices.iter().flatten())
            .find(|d| d.name == r.device)
            .ok_or_else(|| {
                format!(
                    "device {}/{}/{} of ResourceClaim {name} is in no ResourceSlice of this node",
                    r.driver, r.pool, r.device
                )
            })?;
        devices.extend(price(&r.driver, &r.pool, found));
    }
    let sharers = status
        .and_then(|s| s.reserved_for.as_ref())
        .into_iter()
        .flatten()
        .filter(|c| c.resource == "pods")
        .map(|c| c.uid.clone())
        .collect();
    Ok(ClaimDevices {
        claim: name,
        uid: claim.metadata.uid.clone().unwrap_or_default(),
        devices,
        sharers,
    })
}

/// Seconds of `own` (a pod's running spans in one window) weighted by the share the
/// pod has of a claim: in each second, 1 / (the number of the claim's pods running),
/// from `others` (the other sharing pods' spans in the window) and `unseen` (sharing
/// pods this agent has no runs of, counted as running whenever this pod runs).
pub fn shared_seconds(own: &[(i64, i64)], others: &[Vec<(i64, i64)>], unseen: usize) -> f64 {
    let mut points: Vec<i64> = own
        .iter()
        .chain(others.iter().flatten())
        .flat_map(|(s, e)| [*s, *e])
        .collect();
    points.sort_unstable();
    points.dedup();
    let within =
        |spans: &[(i64, i64)], a: i64, b: i64| spans.iter().any(|(s, e)| *s <= a && b <= *e);
    let mut total = 0.0;
    for w in points.windows(2) {
        let (a, b) = (w[0], w[1]);
        if !within(own, a, b) {
            continue;
        }
        let running = 1 + unseen + others.iter().filter(|o| within(o, a, b)).count();
        total += (b - a) as f64 / running as f64;
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_claim_is_split_per_second_among_the_pods_running() {
        // own runs 0–60; the other 20–40: 20 s alone, 20 s halved, 20 s alone
        assert_eq!(shared_seconds(&[(0, 60)], &[vec![(20, 40)]], 0), 50.0);
        // the other 30–90 in a window 0–60 (spans clipped to the window by the caller)
        assert_eq!(shared_seconds(&[(10, 50)], &[vec![(30, 60)]], 0), 30.0);
        // three pods over 0–30
        assert_eq!(
            shared_seconds(&[(0, 30)], &[vec![(0, 30)], vec![(0, 30)]], 0),
            10.0
        );
        // a sharer without known runs is counted as running alongside
        assert_eq!(shared_seconds(&[(0, 30)], &[], 1), 15.0);
        assert_eq!(shared_seconds(&[], &[vec![(0, 30)]], 0), 0.0);
    }
}
