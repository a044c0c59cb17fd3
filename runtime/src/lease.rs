//! One leader-election campaign for every binary that needs one (the operator's
//! replicas, a cluster agent with more than one replica), on kube-lease-manager: the
//! holder renews well within the Lease's duration; another replica takes over only
//! after it expired, with optimistic concurrency on every write.
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Which Lease, and who campaigns for it.
#[derive(Clone, Debug)]
pub struct Lease {
    /// The Lease's namespace.
    pub namespace: String,
    /// The Lease's name.
    pub name: String,
    /// This replica's identity ([`identity`]).
    pub identity: String,
    /// How long the Lease holds without renewal, seconds (at least 2).
    pub secs: u64,
    /// The field manager of the Lease's writes.
    pub field_manager: String,
}

/// This replica's identity: `explicit` (the pod's name) as given, else the host name
/// and pid.
pub fn identity(explicit: Option<String>) -> String {
    if let Some(id) = explicit.filter(|s| !s.is_empty()) {
        return id;
    }
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "tally".into());
    format!("{host}-{}", std::process::id())
}

/// Joins the election: the receiver turns true while this replica leads. Dropping it
/// ends the campaign and releases the Lease (await the task for that).
pub async fn campaign(
    client: kube::Client,
    lease: &Lease,
) -> Result<
    (
        watch::Receiver<bool>,
        JoinHandle<kube_lease_manager::Result<LeaseManager>>,
    ),
    kube_lease_manager::LeaseManagerError,
> {
    let secs = lease.secs.max(2);
    let manager = LeaseManagerBuilder::new(client, &lease.name)
        .with_namespace(&lease.namespace)
        .with_identity(&lease.identity)
        .with_duration(secs)
        .with_grace((secs / 3).clamp(1, 5))
        .with_field_manager(lease.field_manager.clone())
        .build()
        .await?;
    tracing::info!(lease = %format!("{}/{}", lease.namespace, lease.name), identity = %lease.identity, "Joined the leader election");
    Ok(manager.watch().await)
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_explicit_identity_is_kept_as_given() {
        assert_eq!(super::identity(Some("agent-a".into())), "agent-a");
        let derived = super::identity(None);
        assert!(
            derived.ends_with(&format!("-{}", std::process::id())),
            "{derived}"
        );
        assert_eq!(super::identity(Some(String::new())), derived);
    }
}
