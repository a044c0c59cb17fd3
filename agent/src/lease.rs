//! Leader election over a `coordination.k8s.io/v1` Lease, so a cluster agent with
//! several replicas runs its cluster-scoped collectors in exactly one of them.
//!
//! The protocol is the one client-go's leader election uses: the holder renews
//! `renewTime` every `duration / 3`; another replica takes the Lease over (and bumps
//! `leaseTransitions`) only once `renewTime + leaseDurationSeconds` has passed. Every
//! write carries the `resourceVersion` it read, so two replicas racing for an expired
//! Lease cannot both win (the loser gets 409). A holder that could not renew for a
//! whole duration steps down by itself, before anyone else may take over. Written by
//! hand: kube-rs has no leader election, and the third-party crates for it are small
//! and not widely kept. Assumes replicas' clocks agree to well within the duration.
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio::sync::watch;

/// Which Lease, and who we are.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// Lease name.
    pub name: String,
    /// Lease namespace.
    pub namespace: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// How long a Lease is valid without renewal.
    pub duration: Duration,
}

fn micro(t: Timestamp) -> Option<MicroTime> {
    Some(MicroTime(t))
}

fn conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// One round: acquire, renew or observe the Lease at `now`. `Ok(true)` when this
/// replica holds it afterwards.
pub async fn try_acquire(
    api: &Api<Lease>,
    cfg: &LeaseConfig,
    now: Timestamp,
) -> kube::Result<bool> {
    let secs = cfg.duration.as_secs() as i32;
    let Some(mut lease) = api.get_opt(&cfg.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(cfg.name.clone()),
                namespace: Some(cfg.namespace.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(cfg.identity.clone()),
                lease_duration_seconds: Some(secs),
                acquire_time: micro(now),
                renew_time: micro(now),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(e) if conflict(&e) => Ok(false),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    let mine = spec.holder_identity.as_deref() == Some(cfg.identity.as_str());
    if !mine {
        let valid_for = i64::from(spec.lease_duration_seconds.unwrap_or(secs));
        let expired = spec
            .renew_time
            .as_ref()
            .is_none_or(|r| r.0.as_second() + valid_for <= now.as_second());
        if !expired
            && spec
                .holder_identity
                .as_deref()
                .is_some_and(|h| !h.is_empty())
        {
            return Ok(false);
        }
        spec.holder_identity = Some(cfg.identity.clone());
        spec.acquire_time = micro(now);
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.renew_time = micro(now);
    spec.lease_duration_seconds = Some(secs);
    match api.replace(&cfg.name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        Err(e) if conflict(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Campaigns forever, publishing whether this replica leads.
pub async fn campaign(client: Client, cfg: LeaseConfig, leader: watch::Sender<bool>) {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let mut last_renewed: Option<tokio::time::Instant> = None;
    loop {
        let held = match try_acquire(&api, &cfg, Timestamp::now()).await {
            Ok(true) => {
                last_renewed = Some(tokio::time::Instant::now());
                true
            }
            Ok(false) => false,
            Err(e) => {
                tracing::warn!(lease = %cfg.name, error = %e, "Lease update failed");
                // Keep leading only while the last renewal is still valid.
                last_renewed.is_some_and(|t| t.elapsed() < cfg.duration)
            }
        };
        if !held {
            last_renewed = None;
        }
        leader.send_if_modified(|l| {
            let changed = *l != held;
            *l = held;
            if changed {
                tracing::info!(lease = %cfg.name, identity = %cfg.identity, leader = held, "Leadership changed");
            }
            changed
        });
        tokio::time::sleep(cfg.duration / 3).await;
    }
}

#[cfg(test)]
mod tests {
    use http::{Request, Response, StatusCode};
    use kube::client::Body;
    use serde_json::{Value, json};

    use super::*;

    fn cfg() -> LeaseConfig {
        LeaseConfig {
            name: "tally-cluster-agent".into(),
            namespace: "tally".into(),
            identity: "agent-0".into(),
            duration: Duration::from_secs(15),
        }
    }

    fn lease(holder: &str, renew: &str, transitions: i32) -> Value {
        json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "tally-cluster-agent", "namespace": "tally", "resourceVersion": "41"},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15, "renewTime": renew,
                     "acquireTime": renew, "leaseTransitions": transitions}
        })
    }

    fn respond(
        send: tower_test::mock::SendResponse<Response<Body>>,
        status: StatusCode,
        body: Value,
    ) {
        let mut r = Response::new(Body::from(serde_json::to_vec(&body).unwrap()));
        *r.status_mut() = status;
        send.send_response(r);
    }

    fn not_found() -> Value {
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"})
    }

    async fn body_json(req: Request<Body>) -> Value {
        use http_body_util::BodyExt;
        let bytes = req.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

    async fn round(now: &str, script: impl AsyncFnOnce(&mut Handle)) -> bool {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let api: Api<Lease> = Api::namespaced(Client::new(service, "tally"), "tally");
        let now: Timestamp = now.parse().unwrap();
        let cfg = cfg();
        let (held, ()) = tokio::join!(try_acquire(&api, &cfg, now), script(&mut handle));
        held.unwrap()
    }

    #[tokio::test]
    async fn a_missing_lease_is_created_and_held() {
        let held = round("2026-01-01T00:00:00Z", async |h: &mut Handle| {
            let (req, send) = h.next_request().await.unwrap();
            assert_eq!(req.method(), "GET");
            assert_eq!(
                req.uri().path(),
                "/apis/coordination.k8s.io/v1/namespaces/tally/leases/tally-cluster-agent"
            );
            respond(send, StatusCode::NOT_FOUND, not_found());
            let (req, send) = h.next_request().await.unwrap();
            assert_eq!(req.method(), "POST");
            let body = body_json(req).await;
            assert_eq!(body["spec"]["holderIdentity"], "agent-0");
            assert_eq!(body["spec"]["leaseDurationSeconds"], 15);
            respond(send, StatusCode::CREATED, body);
        })
        .await;
        assert!(held);
    }

    #[tokio::test]
    async fn a_fresh_lease_of_another_replica_is_left_alone() {
        let held = round("2026-01-01T00:00:10Z", async |h: &mut Handle| {
            let (_, send) = h.next_request().await.unwrap();
            respond(
                send,
                StatusCode::OK,
                lease("agent-1", "2026-01-01T00:00:00.000000Z", 3),
            );
        })
        .await;
        assert!(!held, "no write while agent-1's lease is valid");
    }

    #[tokio::test]
    async fn an_expired_lease_is_taken_over_with_its_resource_version() {
        let held = round("2026-01-01T00:00:20Z", async |h: &mut Handle| {
            let (_, send) = h.next_request().await.unwrap();
            respond(
                send,
                StatusCode::OK,
                lease("agent-1", "2026-01-01T00:00:00.000000Z", 3),
            );
            let (req, send) = h.next_request().await.unwrap();
            assert_eq!(req.method(), "PUT");
            let body = body_json(req).await;
            assert_eq!(body["metadata"]["resourceVersion"], "41");
            assert_eq!(body["spec"]["holderIdentity"], "agent-0");
            assert_eq!(body["spec"]["leaseTransitions"], 4);
            respond(send, StatusCode::OK, body);
        })
        .await;
        assert!(held);
    }

    #[tokio::test]
    async fn losing_the_race_for_an_expired_lease_is_not_leading() {
        let held = round("2026-01-01T00:00:20Z", async |h: &mut Handle| {
            let (_, send) = h.next_request().await.unwrap();
            respond(send, StatusCode::OK, lease("agent-1", "2026-01-01T00:00:00.000000Z", 3));
            let (_, send) = h.next_request().await.unwrap();
            respond(
                send,
                StatusCode::CONFLICT,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409, "message": "the object has been modified"}),
            );
        })
        .await;
        assert!(!held);
    }

    #[tokio::test]
    async fn the_holder_renews() {
        let held = round("2026-01-01T00:00:05Z", async |h: &mut Handle| {
            let (_, send) = h.next_request().await.unwrap();
            respond(
                send,
                StatusCode::OK,
                lease("agent-0", "2026-01-01T00:00:00.000000Z", 1),
            );
            let (req, send) = h.next_request().await.unwrap();
            let body = body_json(req).await;
            assert_eq!(body["spec"]["renewTime"], "2026-01-01T00:00:05.000000Z");
            assert_eq!(
                body["spec"]["leaseTransitions"], 1,
                "a renewal is not a transition"
            );
            respond(send, StatusCode::OK, body);
        })
        .await;
        assert!(held);
    }
}
