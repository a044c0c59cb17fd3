//! Standard Webhooks delivery: `webhook-id` (the crossing's id, the same on every
//! attempt), `webhook-timestamp` (Unix seconds of the attempt) and `webhook-signature`
//! (`v1,` + base64 of HMAC-SHA256 over `{id}.{timestamp}.{body}`, keyed with the
//! base64-decoded part of a `whsec_…` secret).
//!
//! Where a webhook may go (SSRF guard): `https://` URLs, and `http://` to in-cluster
//! Service names (`*.svc`, `*.svc.cluster.local`); never to a literal link-local,
//! loopback or unspecified address (cloud metadata endpoints live there), whatever the
//! scheme. A namespace (label `tally.dev/webhook-any-url: "true"`, or the standalone
//! server's `--budget-webhook-any-url`) may allow any URL. Names are not resolved here,
//! so a public name pointing at a private address is not caught: put the evaluator
//! behind an egress policy where that matters.
use std::net::IpAddr;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

/// Where a budget's webhook goes and how it is signed.
#[derive(Clone)]
pub struct WebhookTarget {
    /// The receiver.
    pub url: String,
    /// The HMAC key.
    key: Vec<u8>,
}

impl std::fmt::Debug for WebhookTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookTarget")
            .field("url", &self.url)
            .finish()
    }
}

impl WebhookTarget {
    /// A target from a Secret's `url` and `secret` (`whsec_<base64>`, or any other
    /// string, used as the key's bytes), refused unless [`url_allowed`].
    pub fn new(url: &str, secret: &str, any_url: bool) -> Result<WebhookTarget, String> {
        let url = url.trim();
        url_allowed(url, any_url)?;
        let secret = secret.trim();
        let key = match secret.strip_prefix("whsec_") {
            Some(b64) => STANDARD
                .decode(b64)
                .map_err(|e| format!("secret: whsec_ is followed by base64 ({e})"))?,
            None => secret.as_bytes().to_vec(),
        };
        if key.len() < 16 {
            return Err(
                "secret: at least 16 bytes of key (e.g. whsec_ + base64 of 32 random bytes)".into(),
            );
        }
        Ok(WebhookTarget {
            url: url.to_string(),
            key,
        })
    }

    /// `webhook-signature` for `id`, `timestamp` and `body`.
    pub fn signature(&self, id: &str, timestamp: i64, body: &str) -> String {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.key);
        let tag = ring::hmac::sign(&key, format!("{id}.{timestamp}.{body}").as_bytes());
        format!("v1,{}", STANDARD.encode(tag.as_ref()))
    }

    /// One attempt: `Ok` on a 2xx, else why not.
    pub async fn send(
        &self,
        http: &reqwest::Client,
        id: &str,
        timestamp: i64,
        body: &str,
    ) -> Result<(), String> {
        let res = http
            .post(&self.url)
            .timeout(Duration::from_secs(10))
            .header("content-type", "application/json")
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", self.signature(id, timestamp, body))
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| format!("cannot reach {}: {e}", self.url))?;
        if res.status().is_success() {
            Ok(())
        } else {
            Err(format!("{} answered {}", self.url, res.status().as_u16()))
        }
    }
}

/// Whether a webhook may go to `url` (see the module docs).
pub fn url_allowed(url: &str, any_url: bool) -> Result<(), String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| format!("url {url:?}: give an absolute http(s) URL"))?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host_port = authority.rsplit('@').next().unwrap_or_default();
    let host = if let Some(v6) = host_port.strip_prefix('[') {
        v6.split(']').next().unwrap_or_default()
    } else {
        host_port.split(':').next().unwrap_or_default()
    };
    if host.is_empty() {
        return Err(format!("url {url:?}: no host"));
    }
    if !matches!(scheme, "http" | "https") {
        return Err(format!("url {url:?}: only http and https"));
    }
    if any_url {
        return Ok(());
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        let internal = match ip {
            IpAddr::V4(v4) => v4.is_loopback() || v4.is_link_local() || v4.is_unspecified(),
            IpAddr::V6(v6) => {
                v6.is_loopback() || v6.is_unspecified() || (v6.segments()[0] & 0xffc0) == 0xfe80
            }
        };
        if internal {
            return Err(format!(
                "url {url:?}: a loopback or link-local address (allow it for the namespace with the label tally.dev/webhook-any-url=true)"
            ));
        }
    }
    let in_cluster = host.ends_with(".svc") || host.ends_with(".svc.cluster.local");
    if scheme == "https" || in_cluster {
        Ok(())
    } else {
        Err(format!(
            "url {url:?}: plain http only to in-cluster Services (*.svc); use https, or allow any URL for the namespace with the label tally.dev/webhook-any-url=true"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_standard_webhooks() {
        // whsec_ + base64 of "0123456789abcdef0123456789abcdef"
        let t = WebhookTarget::new(
            "https://hooks.example.com/x",
            "whsec_MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
            false,
        )
        .unwrap();
        let sig = t.signature("msg_1", 1_700_000_000, "{\"a\":1}");
        let key =
            ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"0123456789abcdef0123456789abcdef");
        let expected =
            STANDARD.encode(ring::hmac::sign(&key, b"msg_1.1700000000.{\"a\":1}").as_ref());
        assert_eq!(sig, format!("v1,{expected}"));
    }

    #[test]
    fn webhooks_go_to_https_or_in_cluster_services_unless_allowed() {
        for ok in [
            "https://hooks.example.com/budget",
            "http://billing.payments.svc/hook",
            "http://billing.payments.svc.cluster.local:8080/hook",
        ] {
            assert!(url_allowed(ok, false).is_ok(), "{ok}");
        }
        for bad in [
            "http://hooks.example.com/budget",
            "https://169.254.169.254/latest/meta-data",
            "http://127.0.0.1:9000/x",
            "https://[::1]/x",
            "ftp://x.svc/",
            "hooks.example.com",
        ] {
            assert!(url_allowed(bad, false).is_err(), "{bad}");
        }
        assert!(url_allowed("http://127.0.0.1:9000/x", true).is_ok());
        assert!(WebhookTarget::new("https://x.example/", "short", false).is_err());
    }
}
