//! Accelerators a pod holds, as shares of whole devices, from what Kubernetes says:
//! the pod's extended-resource requests and its Node's labels (NVIDIA's GPU Feature
//! Discovery, GFD) and annotations (HAMi).
//!
//! Each kind of accelerator a pod holds is one [`Use`]: its resource name, how the
//! device is shared ([`Sharing`]), the product, and `gpus` = whole-device equivalents.
//! The rules, per resource the pod requests (the request is the count: a device
//! request needs an equal limit):
//! - `nvidia.com/gpu`, exclusive: one GPU per unit. On a node without GFD labels this
//!   is all tally can know; the use says so (`labels_known = false`).
//! - `nvidia.com/gpu` on a node labelled `nvidia.com/gpu.replicas: N` (N > 1;
//!   time-slicing or MPS per `nvidia.com/gpu.sharing-strategy`, time-slicing when the
//!   label is absent), and `nvidia.com/gpu.shared` (the renamed replicas): 1/N GPU per
//!   unit.
//! - MIG, mixed strategy: `nvidia.com/mig-<g>g.<mem>gb` (also `+me`-style suffixes and
//!   compute-instance profiles `<c>c.<g>g.<mem>gb`): g / S GPU per unit (c / S for a
//!   compute-instance profile), where S is the compute slices of the parent product
//!   ([`mig_slices`]), divided by `nvidia.com/mig-<profile>.replicas` when the device
//!   is shared further (resource `nvidia.com/mig-<profile>.shared` too).
//! - MIG, single strategy (`nvidia.com/mig.strategy: single`): `nvidia.com/gpu` units
//!   are MIG devices; the profile is the suffix of `nvidia.com/gpu.product`
//!   (`…-MIG-1g.5gb`).
//! - HAMi: a pod requesting `nvidia.com/gpucores` or `nvidia.com/gpumem`, or any
//!   `nvidia.com/gpu` on a node HAMi registered (annotation
//!   `hami.io/node-nvidia-register`): each `nvidia.com/gpu` unit is a vGPU worth
//!   `gpucores`/100 GPU (the whole GPU without `gpucores`), with `gpumem` MiB.
//! - whole devices of other vendors by resource name ([`DEFAULT_WHOLE_DEVICES`], or
//!   the Collector's `wholeDeviceResources`): one device per unit. Shares such as
//!   `gpu.intel.com/millicores` are never counted as devices.
//!
//! Memory (`memory_mib`, the device memory the use holds) comes from
//! `nvidia.com/mig-<profile>.memory` (MIG, mixed), `nvidia.com/gpu.memory` (others),
//! divided like the compute for replicas (a replica's fair share: time-slicing does
//! not partition memory, MPS limits each client to it), or `gpumem` (HAMi).
//!
//! A share that cannot be known (a MIG profile whose parent product is not in the
//! table, or a profile name that does not parse) is reported with the reason and has
//! `gpus = None`: it is never billed as 0 or as a whole GPU.
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Node;

use super::resources::Resources;

/// Whole-device resources of vendors other than NVIDIA, counted one device per unit
/// when a Collector does not name its own.
pub const DEFAULT_WHOLE_DEVICES: &[&str] = &[
    "amd.com/gpu",
    "gpu.intel.com/i915",
    "gpu.intel.com/xe",
    "google.com/tpu",
    "aws.amazon.com/neuron",
];

/// Compute slices of a MIG-capable GPU (the `7g` of its largest profile), by the
/// product's model token. Source: NVIDIA's MIG User Guide, "Supported MIG Profiles"
/// (A100, A800, H100, H800, H20, H200, B200 and GB200: 7 slices; A30: 4 slices).
pub fn mig_slices(product: &str) -> Option<u32> {
    const TABLE: &[(&str, u32)] = &[
        ("A100", 7),
        ("A800", 7),
        ("H100", 7),
        ("H800", 7),
        ("H20", 7),
        ("H200", 7),
        ("B200", 7),
        ("GB200", 7),
        ("A30", 4),
    ];
    let upper = product.to_ascii_uppercase();
    upper
        .split(['-', ' ', '_'])
        .find_map(|token| TABLE.iter().find(|(m, _)| *m == token).map(|(_, s)| *s))
}

/// How a device is shared, as the event's `gpu_sharing`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sharing {
    /// A whole device.
    Exclusive,
    /// A MIG partition.
    Mig,
    /// A time-sliced replica.
    TimeSlicing,
    /// An MPS client share.
    Mps,
    /// A device allocated through Dynamic Resource Allocation.
    Dra,
    /// A HAMi virtual GPU.
    Hami,
}

impl Sharing {
    /// The event value.
    pub fn as_str(self) -> &'static str {
        match self {
            Sharing::Exclusive => "exclusive",
            Sharing::Mig => "mig",
            Sharing::TimeSlicing => "time-slicing",
            Sharing::Mps => "mps",
            Sharing::Dra => "dra",
            Sharing::Hami => "hami",
        }
    }
}

/// One kind of accelerator a pod holds.
#[derive(Clone, Debug, PartialEq)]
pub struct Use {
    /// The resource name (e.g. `nvidia.com/mig-3g.20gb`).
    pub resource: String,
    /// How the device is shared.
    pub sharing: Sharing,
    /// The product (GFD's `nvidia.com/gpu.product`, without `-SHARED` / `-MIG-…`).
    pub product: Option<String>,
    /// The MIG profile (e.g. `3g.20gb`).
    pub profile: Option<String>,
    /// Units requested.
    pub devices: f64,
    /// Replicas each device is shared by (time-slicing, MPS, shared MIG), when > 1.
    pub replicas: Option<u32>,
    /// Whole-device equivalents; `None` when the share cannot be known.
    pub gpus: Option<f64>,
    /// Device memory held, MiB.
    pub memory_mib: Option<f64>,
    /// Why `gpus` is unknown.
    pub unknown: Option<String>,
    /// Whether the node's GFD labels were known (false: treated as exclusive).
    pub labels_known: bool,
    /// Seconds billed when not the pod's running time (a DRA claim shared with other
    /// pods: [`super::dra::shared_seconds`]).
    pub seconds: Option<f64>,
    /// Pods a DRA claim is reserved for, when more than one.
    pub sharers: Option<usize>,
}

/// What tally reads from this node: labels and annotations.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeInfo {
    /// Whether the Node was read at all.
    pub known: bool,
    /// The Node's labels.
    pub labels: BTreeMap<String, String>,
    /// The Node's annotations.
    pub annotations: BTreeMap<String, String>,
}

impl NodeInfo {
    /// From the Node object.
    pub fn of(node: &Node) -> NodeInfo {
        NodeInfo {
            known: true,
            labels: node.metadata.labels.clone().unwrap_or_default(),
            annotations: node.metadata.annotations.clone().unwrap_or_default(),
        }
    }

    fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    fn number(&self, key: &str) -> Option<f64> {
        self.label(key)
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|n| n.is_finite() && *n > 0.0)
    }

    fn replicas(&self, key: &str) -> Option<u32> {
        self.label(key)
            .and_then(|v| v.parse::<u32>().ok())
            .filter(|n| *n > 1)
    }

    /// Whether GFD labelled this node.
    fn has_gfd(&self) -> bool {
        self.labels.keys().any(|k| k.starts_with("nvidia.com/"))
    }

    /// `nvidia.com/gpu.product`, without the `-SHARED` suffix GFD adds for replicas.
    fn product(&self) -> Option<String> {
        self.label("nvidia.com/gpu.product")
            .map(|p| p.strip_suffix("-SHARED").unwrap_or(p).to_string())
    }
}

/// A parsed MIG profile: (compute slices of a compute instance, GPU-instance slices).
fn parse_profile(profile: &str) -> Option<(Option<u32>, u32)> {
    // `1g.5gb`, `1g.10gb+me`, `1c.3g.20gb`, `7g.80gb`
    let base = profile.split('+').next()?;
    let mut parts = base.split('.');
    let first = parts.next()?;
    let (ci, gi) = match first.strip_suffix('c') {
        Some(c) => (
            Some(c.parse().ok()?),
            parts.next()?.strip_suffix('g')?.parse().ok()?,
        ),
        None => (None, first.strip_suffix('g')?.parse().ok()?),
    };
    let mem = parts.next()?;
    mem.strip_suffix("gb")?.parse::<f64>().ok()?;
    if parts.next().is_some() || gi == 0 || ci.is_some_and(|c: u32| c == 0 || c > gi) {
        return None;
    }
    Some((ci, gi))
}

/// The share of one MIG device of `profile` on a parent `product` (extended
/// resources and DRA devices alike).
pub(crate) fn mig_share(profile: &str, product: Option<&str>) -> Result<f64, String> {
    let Some((ci, gi)) = parse_profile(profile) else {
        return Err(format!(
            "MIG profile {profile:?} is not of the form <g>g.<mem>gb"
        ));
    };
    let Some(product) = product else {
        return Err(format!(
            "MIG profile {profile} on a node without the nvidia.com/gpu.product label: the parent GPU's compute slices are unknown"
        ));
    };
    let Some(slices) = mig_slices(product) else {
        return Err(format!(
            "MIG profile {profile} on product {product}: its compute slices are not in tally's table"
        ));
    };
    if gi > slices {
        return Err(format!(
            "MIG profile {profile} has more slices than product {product} ({slices})"
        ));
    }
    Ok(f64::from(ci.unwrap_or(gi)) / f64::from(slices))
}

fn amount(r: &Resources, name: &str) -> Option<f64> {
    r.requests
        .get(name)
        .or_else(|| r.limits.get(name))
        .copied()
        .filter(|n| *n > 0.0)
}

/// The accelerators `r` holds on `node`, ordered by resource name. `whole` are the
/// other vendors' whole-device resources.
pub fn uses(r: &Resources, node: &NodeInfo, whole: &[String]) -> Vec<Use> {
    let mut out = Vec::new();
    let labels_known = node.known && node.has_gfd();
    let product = node.product();
    let base = |resource: &str, sharing, devices| Use {
        resource: resource.to_string(),
        sharing,
        product: product.clone(),
        profile: None,
        devices,
        replicas: None,
        gpus: Some(devices),
        memory_mib: None,
        unknown: None,
        labels_known,
        seconds: None,
        sharers: None,
    };
    let gpu_memory = node.number("nvidia.com/gpu.memory");
    let hami = ["nvidia.com/gpucores", "nvidia.com/gpumem"]
        .iter()
        .any(|k| amount(r, k).is_some())
        || node
            .annotations
            .contains_key("hami.io/node-nvidia-register");
    let names: std::collections::BTreeSet<&String> =
        r.requests.keys().chain(r.limits.keys()).collect();
    for name in names {
        let Some(n) = amount(r, name) else { continue };
        if name == "nvidia.com/gpu" && hami {
            let mut u = base(name, Sharing::Hami, n);
            let cores = amount(r, "nvidia.com/gpucores").map_or(1.0, |c| c / 100.0);
            u.gpus = Some(n * cores);
            u.memory_mib = amount(r, "nvidia.com/gpumem").map(|m| m * n);
            out.push(u);
        } else if name == "nvidia.com/gpu" || name == "nvidia.com/gpu.shared" {
            let single_mig = node.label("nvidia.com/mig.strategy") == Some("single");
            let mig_product = product
                .as_deref()
                .and_then(|p| p.split_once("-MIG-"))
                .filter(|_| single_mig);
            let replicas = node.replicas("nvidia.com/gpu.replicas");
            let mut u = base(name, Sharing::Exclusive, n);
            let divide = f64::from(replicas.unwrap_or(1));
            if let Some((parent, profile)) = mig_product {
                u.sharing = Sharing::Mig;
                u.product = Some(parent.to_string());
                u.profile = Some(profile.to_string());
                match mig_share(profile, Some(parent)) {
                    Ok(s) => u.gpus = Some(n * s / divide),
                    Err(why) => {
                        u.gpus = None;
                        u.unknown = Some(why);
                    }
                }
            } else {
                if replicas.is_some() || name == "nvidia.com/gpu.shared" {
                    u.sharing = match node.label("nvidia.com/gpu.sharing-strategy") {
                        Some("mps") => Sharing::Mps,
                        _ => Sharing::TimeSlicing,
                    };
                }
                if name == "nvidia.com/gpu.shared" && replicas.is_none() {
                    u.gpus = None;
                    u.unknown = Some(
                        "nvidia.com/gpu.shared on a node without the nvidia.com/gpu.replicas label: the share of a replica is unknown".into(),
                    );
                } else {
                    u.gpus = Some(n / divide);
                }
            }
            u.replicas = replicas;
            u.memory_mib = gpu_memory.map(|m| m * n / divide);
            out.push(u);
        } else if let Some(rest) = name.strip_prefix("nvidia.com/mig-") {
            let (profile, shared) = match rest.strip_suffix(".shared") {
                Some(p) => (p, true),
                None => (rest, false),
            };
            let replicas = node.replicas(&format!("nvidia.com/mig-{profile}.replicas"));
            let mut u = base(name, Sharing::Mig, n);
            u.profile = Some(profile.to_string());
            u.replicas = replicas;
            let divide = f64::from(replicas.unwrap_or(1));
            match mig_share(profile, product.as_deref()) {
                Ok(_) if shared && replicas.is_none() => {
                    u.gpus = None;
                    u.unknown = Some(format!(
                        "{name} on a node without the nvidia.com/mig-{profile}.replicas label: the share of a replica is unknown"
                    ));
                }
                Ok(s) => u.gpus = Some(n * s / divide),
                Err(why) => {
                    u.gpus = None;
                    u.unknown = Some(why);
                }
            }
            u.memory_mib = node
                .number(&format!("nvidia.com/mig-{profile}.memory"))
                .map(|m| m * n / divide);
            out.push(u);
        } else if whole.iter().any(|w| w == name) {
            let mut u = base(name, Sharing::Exclusive, n);
            u.product = None;
            u.labels_known = node.known;
            out.push(u);
        }
    }
    out
}

/// The Collector's whole-device resources, or the defaults.
pub fn whole_devices(configured: &[String]) -> Vec<String> {
    if configured.is_empty() {
        DEFAULT_WHOLE_DEVICES
            .iter()
            .map(|s| s.to_string())
            .collect()
    } else {
        configured.to_vec()
    }
}
