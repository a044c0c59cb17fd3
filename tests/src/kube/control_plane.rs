//! A real Kubernetes control plane on loopback: etcd, kube-apiserver and
//! kube-controller-manager from `KUBEBUILDER_ASSETS` (a folder holding the three
//! binaries, as envtest lays them out), one per test binary, shared by its tests.
//!
//! # Model
//! - Started lazily by the first test of a binary that asks ([`ControlPlane::shared`]),
//!   kept until the test process ends. Cargo runs test binaries one after another, so
//!   control planes of different binaries never serve tests at the same time; tests
//!   inside one binary share it and must keep to their own namespaces and Nodes.
//! - Statics are never dropped, so a watchdog process (`sh`) started first watches the
//!   test process and, once it is gone (passed, failed or killed), stops the three by PID
//!   in reverse start order — controller-manager, apiserver, etcd, each waited for,
//!   SIGKILL after 5 s (an apiserver whose etcd went first may hang on SIGTERM) — and
//!   removes the folder (kept with `TALLY_KEEP_LOGS`).
//! - kube-apiserver cannot bind port 0, so ports are picked free and a start that lost
//!   the port to someone else ("address already in use") is retried with new ones.
//! - The apiserver enforces RBAC (`--authorization-mode=RBAC`) and writes an audit log
//!   (metadata of every request but the controller-manager's): tests connect as
//!   `admin` (group `system:masters`, which RBAC always allows) unless they ask for a
//!   ServiceAccount's token, which then holds exactly what its Roles grant.
//! - Static token identities besides `admin` ([`IDENTITIES`]) let a test tell apart, in
//!   the audit log, what tally's binaries did from what the test itself did.
//! - etcd keeps its data under `/dev/shm` when it exists: fsyncs there cost nothing
//!   (etcd 3.4 has no `--unsafe-no-fsync`), and nothing in a test's cluster must
//!   outlive the test process.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The binaries a control plane needs, all in `KUBEBUILDER_ASSETS`.
pub const ASSETS: [&str; 3] = ["etcd", "kube-apiserver", "kube-controller-manager"];

/// Static token users of every control plane (all in `system:masters`): tests hand
/// [`ControlPlane::kubeconfig_as`] files to tally's binaries so the audit log names them.
pub const IDENTITIES: [&str; 4] = ["admin", "tally-operator", "tally-server", "tally-agent"];

/// How long start-up may take before it is a failure (seen: 3–5 s on 2 cores).
const READY_LIMIT: Duration = Duration::from_secs(90);

/// Attempts at picking free ports before giving up.
const PORT_TRIES: usize = 5;

/// The service network the apiserver allocates ClusterIPs from (nothing routes it).
const SERVICE_CIDR: &str = "10.96.0.0/16";

/// Audit policy: metadata of every request, once (at the response), except the
/// controller-manager's (it lists and watches all the time and is not under test).
const AUDIT_POLICY: &str = "apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: None
  users: [system:kube-controller-manager]
- level: None
  nonResourceURLs: ['/readyz*', '/livez*', '/healthz*']
- level: Metadata
";

/// A running control plane.
#[derive(Debug)]
pub struct ControlPlane {
    /// `https://127.0.0.1:port`.
    pub url: String,
    /// The folder with the certificates, logs, kubeconfigs and audit log.
    pub dir: PathBuf,
    /// The admin kubeconfig.
    pub kubeconfig: PathBuf,
    /// The apiserver's audit log (JSON lines).
    pub audit_log: PathBuf,
    /// The apiserver's `/version` `gitVersion`.
    pub version: String,
    /// Wall time from the first process started to the controllers running.
    pub started_in: Duration,
    tokens: Vec<(String, String)>,
    pids: Vec<u32>,
    _children: Vec<Child>,
    _watchdog: Child,
}

/// Where the assets are, or why there are none (`Err` names the missing binary or the
/// missing variable).
pub fn assets() -> Result<PathBuf, String> {
    assets_in(std::env::var_os("KUBEBUILDER_ASSETS").as_deref())
}

/// [`assets`] for a given value of `KUBEBUILDER_ASSETS`.
pub fn assets_in(value: Option<&std::ffi::OsStr>) -> Result<PathBuf, String> {
    let dir = value
        .filter(|d| !d.is_empty())
        .ok_or("KUBEBUILDER_ASSETS is not set (a folder with etcd, kube-apiserver and kube-controller-manager; `make test` sets it from ../shared/envtest/install.sh)")?;
    let dir = PathBuf::from(dir);
    for name in ASSETS {
        if !dir.join(name).is_file() {
            return Err(format!(
                "KUBEBUILDER_ASSETS={} has no {name} (it needs etcd, kube-apiserver and kube-controller-manager)",
                dir.display()
            ));
        }
    }
    Ok(dir)
}

impl ControlPlane {
    /// This test binary's control plane, started on first use.
    pub async fn shared() -> Result<&'static ControlPlane, String> {
        static PLANE: tokio::sync::OnceCell<Result<ControlPlane, String>> =
            tokio::sync::OnceCell::const_new();
        PLANE
            .get_or_init(|| async {
                let bin = assets()?;
                let plane = ControlPlane::start(&bin).await?;
                crate::say(&format!(
                    "control plane: kube-apiserver {} (/version) at {} ready in {:.1?} ({})",
                    plane.version,
                    plane.url,
                    plane.started_in,
                    plane.dir.display()
                ));
                Ok(plane)
            })
            .await
            .as_ref()
            .map_err(Clone::clone)
    }

    /// Starts etcd, kube-apiserver and kube-controller-manager from `bin` and waits
    /// until the API is ready and the controllers run.
    pub async fn start(bin: &Path) -> Result<ControlPlane, String> {
        let started = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("tally-control-plane-")
            .tempdir()
            .map_err(|e| format!("a folder for the control plane: {e}"))?
            .keep();
        let shm = Path::new("/dev/shm");
        let etcd_dir = if shm.is_dir() {
            tempfile::Builder::new()
                .prefix("tally-etcd-")
                .tempdir_in(shm)
                .map_err(|e| format!("etcd's folder in /dev/shm: {e}"))?
                .keep()
        } else {
            dir.join("etcd")
        };
        let watchdog = watchdog(&dir, &etcd_dir)?;
        let pki = dir.join("pki");
        std::fs::create_dir_all(&pki).map_err(|e| format!("{}: {e}", pki.display()))?;
        openssl(&["genrsa", "-out", "sa.key", "2048"], &pki)?;
        openssl(&["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"], &pki)?;
        let tokens: Vec<(String, String)> = IDENTITIES
            .iter()
            .map(|who| (who.to_string(), random_token()))
            .collect();
        let mut csv: String = tokens
            .iter()
            .map(|(who, t)| format!("{t},{who},uid-{who},\"system:masters\"\n"))
            .collect();
        let cm_token = random_token();
        csv.push_str(&format!(
            "{cm_token},system:kube-controller-manager,uid-kcm,\"system:masters\"\n"
        ));
        write(&pki.join("tokens.csv"), &csv)?;
        write(&dir.join("audit-policy.yaml"), AUDIT_POLICY)?;

        let mut children = Vec::new();
        let (etcd, etcd_url) = start_etcd(bin, &dir, &etcd_dir).await?;
        record_pid(&dir, etcd.id())?;
        children.push(etcd);
        let admin = tokens
            .iter()
            .find(|(who, _)| who == "admin")
            .map(|(_, t)| t.clone())
            .expect("admin is an identity");
        let (apiserver, port) = start_apiserver(bin, &dir, &etcd_url, &admin).await?;
        record_pid(&dir, apiserver.id())?;
        children.push(apiserver);
        let url = format!("https://127.0.0.1:{port}");
        let ca = pki.join("apiserver.crt");
        write(
            &dir.join("kcm.kubeconfig"),
            &kubeconfig_yaml(&url, Some(&ca), &cm_token),
        )?;
        let mut plane = ControlPlane {
            url: url.clone(),
            kubeconfig: dir.join("kubeconfig"),
            audit_log: dir.join("audit.log"),
            version: String::new(),
            started_in: Duration::ZERO,
            tokens,
            pids: Vec::new(),
            _children: Vec::new(),
            _watchdog: watchdog,
            dir: dir.clone(),
        };
        write(&plane.kubeconfig, &kubeconfig_yaml(&url, Some(&ca), &admin))?;
        let client = client_for(&plane.kubeconfig).await?;
        plane.version = client
            .apiserver_version()
            .await
            .map_err(|e| format!("kube-apiserver /version: {e}"))?
            .git_version;
        let kcm = start_controller_manager(bin, &dir)?;
        record_pid(&dir, kcm.id())?;
        children.push(kcm);
        // The service-account controller making `default` in a new namespace shows the
        // controllers run (and `default` itself is made by the apiserver).
        let sas: kube::Api<k8s_openapi::api::core::v1::ServiceAccount> =
            kube::Api::namespaced(client, "default");
        let deadline = Instant::now() + READY_LIMIT;
        loop {
            if let Ok(Some(_)) = sas.get_opt("default").await {
                break;
            }
            if let Some(c) = children.last_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                return Err(format!(
                    "kube-controller-manager exited ({status}):\n{}",
                    tail(&dir.join("kube-controller-manager.log"))
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "kube-controller-manager made no ServiceAccount in {READY_LIMIT:?}:\n{}",
                    tail(&dir.join("kube-controller-manager.log"))
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        plane.started_in = started.elapsed();
        plane.pids = children.iter().map(Child::id).collect();
        plane._children = children;
        Ok(plane)
    }

    /// The static token of `identity` (one of [`IDENTITIES`]).
    pub fn token(&self, identity: &str) -> &str {
        self.tokens
            .iter()
            .find(|(who, _)| who == identity)
            .map(|(_, t)| t.as_str())
            .unwrap_or_else(|| panic!("{identity} is not one of {IDENTITIES:?}"))
    }

    /// A kubeconfig in `dir` that authenticates as `identity` (one of [`IDENTITIES`]).
    pub fn kubeconfig_as(&self, identity: &str, dir: &Path) -> PathBuf {
        self.kubeconfig_with_token(self.token(identity), &format!("{identity}.kubeconfig"), dir)
    }

    /// A kubeconfig `dir/file` that authenticates with a bearer `token` (e.g. a
    /// ServiceAccount's, from a TokenRequest).
    pub fn kubeconfig_with_token(&self, token: &str, file: &str, dir: &Path) -> PathBuf {
        let path = dir.join(file);
        let ca = self.dir.join("pki/apiserver.crt");
        write(&path, &kubeconfig_yaml(&self.url, Some(&ca), token)).expect("write a kubeconfig");
        path
    }

    /// The PIDs of etcd, kube-apiserver and kube-controller-manager.
    pub fn pids(&self) -> &[u32] {
        &self.pids
    }

    /// Peak resident memory (`VmHWM`) of etcd, kube-apiserver and
    /// kube-controller-manager so far, in bytes, in that order.
    pub fn peak_rss(&self) -> Vec<(&'static str, u64)> {
        ASSETS
            .iter()
            .zip(&self.pids)
            .map(|(name, pid)| {
                let status =
                    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                let kb = status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmHWM:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                    .unwrap_or(0);
                (*name, kb * 1024)
            })
            .collect()
    }

    /// A line for the log: start time and each process's peak RSS.
    pub fn report(&self) -> String {
        let rss: Vec<String> = self
            .peak_rss()
            .iter()
            .map(|(n, b)| format!("{n} {:.0} MiB", *b as f64 / 1048576.0))
            .collect();
        format!(
            "control plane {}: started in {:.1?}, peak RSS {}",
            self.url,
            self.started_in,
            rss.join(", ")
        )
    }

    /// The audit log's events so far (JSON objects, oldest first).
    pub fn audit_events(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.audit_log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

/// A kube client from a kubeconfig file.
pub async fn client_for(kubeconfig: &Path) -> Result<kube::Client, String> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)
        .map_err(|e| format!("read {}: {e}", kubeconfig.display()))?;
    let config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .map_err(|e| format!("a config from {}: {e}", kubeconfig.display()))?;
    kube::Client::try_from(config).map_err(|e| format!("a kube client: {e}"))
}

/// A kubeconfig for `url` with a bearer `token`, trusting `ca` (or nothing checked).
pub fn kubeconfig_yaml(url: &str, ca: Option<&Path>, token: &str) -> String {
    let trust = match ca {
        Some(ca) => format!("certificate-authority: {}", ca.display()),
        None => "insecure-skip-tls-verify: true".into(),
    };
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: tally-test\n  cluster:\n    server: {url}\n    {trust}\nusers:\n- name: tally-test\n  user:\n    token: {token}\ncontexts:\n- name: tally-test\n  context:\n    cluster: tally-test\n    user: tally-test\n    namespace: default\ncurrent-context: tally-test\n"
    )
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("write {}: {e}", path.display()))
}

fn openssl(args: &[&str], dir: &Path) -> Result<(), String> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .map_err(|e| format!("openssl (to make the service-account key pair): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// 32 hex digits from the kernel's random source.
fn random_token() -> String {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("read /dev/urandom");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The last lines of a log, for an error message.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(25)..].join("\n")
}

fn spawn(program: &Path, args: &[String], log: &Path) -> Result<Child, String> {
    let out = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .spawn()
        .map_err(|e| format!("{} does not start: {e}", program.display()))
}

/// Appends a PID to the folder's `pids` (start order), which the watchdog stops.
fn record_pid(dir: &Path, pid: u32) -> Result<(), String> {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("pids"))
        .and_then(|mut f| writeln!(f, "{pid}"))
        .map_err(|e| format!("record pid: {e}"))
}

/// Whether a start failed because its port was taken (then: try other ports).
fn lost_port(log: &Path) -> bool {
    std::fs::read_to_string(log).is_ok_and(|t| t.contains("address already in use"))
}

/// The watchdog: waits for this test process to end, then stops what `dir/pids` lists,
/// last first, and removes the folders (unless `TALLY_KEEP_LOGS`).
fn watchdog(dir: &Path, etcd_dir: &Path) -> Result<Child, String> {
    const SCRIPT: &str = r#"
parent=$1; dir=$2; etcd=$3; keep=$4
alive() { s=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -c1); [ -n "$s" ] && [ "$s" != Z ]; }
while alive "$parent"; do sleep 1; done
for pid in $(tac "$dir/pids" 2>/dev/null); do
  kill -TERM "$pid" 2>/dev/null
  i=0; while alive "$pid" && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
  kill -KILL "$pid" 2>/dev/null
done
rm -rf "$etcd"
[ -n "$keep" ] || rm -rf "$dir"
"#;
    let keep = std::env::var("TALLY_KEEP_LOGS").unwrap_or_default();
    let log = std::fs::File::create(dir.join("watchdog.log")).map_err(|e| e.to_string())?;
    Command::new("sh")
        .args(["-c", SCRIPT, "watchdog"])
        .arg(std::process::id().to_string())
        .arg(dir)
        .arg(etcd_dir)
        .arg(keep)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone().map_err(|e| e.to_string())?))
        .stderr(Stdio::from(log))
        .spawn()
        .map_err(|e| format!("the control plane's watchdog (sh) does not start: {e}"))
}

/// Starts `program` (logging to `log`) with the arguments `pick` makes from freshly
/// picked ports, until `ready` says it serves; a start that lost a port to someone
/// else ("address already in use") is retried with new ones. Returns the process and
/// what `pick` returned with the arguments (the address to reach it at).
async fn start_on_free_ports<A>(
    program: &Path,
    log: &Path,
    pick: impl Fn() -> (Vec<String>, A),
    ready: impl AsyncFn(&A) -> bool,
) -> Result<(Child, A), String> {
    let name = program.file_name().unwrap_or_default().to_string_lossy();
    for _ in 0..PORT_TRIES {
        let (args, addr) = pick();
        let mut child = spawn(program, &args, log)?;
        let deadline = Instant::now() + READY_LIMIT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                if lost_port(log) {
                    break;
                }
                return Err(format!("{name} exited ({status}):\n{}", tail(log)));
            }
            if ready(&addr).await {
                return Ok((child, addr));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err(format!(
                    "{name} not ready in {READY_LIMIT:?}:\n{}",
                    tail(log)
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Err(format!("{name} found no free ports in {PORT_TRIES} tries"))
}

async fn start_etcd(bin: &Path, dir: &Path, data: &Path) -> Result<(Child, String), String> {
    let pick = || {
        let client_url = format!("http://127.0.0.1:{}", crate::free_port());
        let peer_url = format!("http://127.0.0.1:{}", crate::free_port());
        let args = vec![
            "--name=tally-test".to_string(),
            format!("--data-dir={}", data.display()),
            format!("--listen-client-urls={client_url}"),
            format!("--advertise-client-urls={client_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=tally-test={peer_url}"),
        ];
        (args, client_url)
    };
    let http = reqwest::Client::new();
    let healthy = async |url: &String| match http.get(format!("{url}/health")).send().await {
        Ok(r) => r.text().await.is_ok_and(|t| t.contains("true")),
        Err(_) => false,
    };
    start_on_free_ports(&bin.join("etcd"), &dir.join("etcd.log"), pick, healthy).await
}

async fn start_apiserver(
    bin: &Path,
    dir: &Path,
    etcd: &str,
    admin_token: &str,
) -> Result<(Child, u16), String> {
    let pki = dir.join("pki");
    let p = |name: &str| pki.join(name).display().to_string();
    let pick = || {
        let port = crate::free_port();
        let args = vec![
            format!("--etcd-servers={etcd}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={port}"),
            format!("--cert-dir={}", pki.display()),
            format!("--token-auth-file={}", p("tokens.csv")),
            "--authorization-mode=RBAC".into(),
            format!("--service-account-key-file={}", p("sa.pub")),
            format!("--service-account-signing-key-file={}", p("sa.key")),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            "--endpoint-reconciler-type=none".into(),
            format!(
                "--audit-policy-file={}",
                dir.join("audit-policy.yaml").display()
            ),
            format!("--audit-log-path={}", dir.join("audit.log").display()),
            "--audit-log-maxsize=200".into(),
        ];
        (args, port)
    };
    // Readiness over TLS needs a client, which needs the serving certificate the
    // apiserver writes into --cert-dir at start; until then, only the process counts.
    let serving = async |port: &u16| {
        pki.join("apiserver.crt").is_file()
            && std::net::TcpStream::connect(("127.0.0.1", *port)).is_ok()
            && ready(dir, *port, admin_token).await
    };
    let log = dir.join("kube-apiserver.log");
    start_on_free_ports(&bin.join("kube-apiserver"), &log, pick, serving).await
}

/// `/readyz` answers `ok` (and so does `/openapi/v3`, which `kubectl apply` needs).
async fn ready(dir: &Path, port: u16, token: &str) -> bool {
    let probe = dir.join("probe.kubeconfig");
    let yaml = kubeconfig_yaml(
        &format!("https://127.0.0.1:{port}"),
        Some(&dir.join("pki/apiserver.crt")),
        token,
    );
    if write(&probe, &yaml).is_err() {
        return false;
    }
    let Ok(client) = client_for(&probe).await else {
        return false;
    };
    let get = |path: &str| {
        http::Request::get(path.to_string())
            .body(Vec::new())
            .expect("a GET request")
    };
    let readyz = client.request_text(get("/readyz")).await;
    let openapi = client.request_text(get("/openapi/v3")).await;
    matches!(readyz.as_deref(), Ok("ok")) && openapi.is_ok()
}

fn start_controller_manager(bin: &Path, dir: &Path) -> Result<Child, String> {
    let kc = dir.join("kcm.kubeconfig").display().to_string();
    let args: Vec<String> = [
        format!("--kubeconfig={kc}"),
        format!("--authentication-kubeconfig={kc}"),
        format!("--authorization-kubeconfig={kc}"),
        "--bind-address=127.0.0.1".into(),
        "--secure-port=0".into(),
        format!(
            "--service-account-private-key-file={}",
            dir.join("pki/sa.key").display()
        ),
        format!("--root-ca-file={}", dir.join("pki/apiserver.crt").display()),
        "--use-service-account-credentials=false".into(),
        format!("--service-cluster-ip-range={SERVICE_CIDR}"),
        "--leader-elect=false".into(),
    ]
    .into();
    spawn(
        &bin.join("kube-controller-manager"),
        &args,
        &dir.join("kube-controller-manager.log"),
    )
}

/// A place in the audit log ([`ControlPlane::audit_mark`]).
#[derive(Clone, Copy, Debug)]
pub struct AuditMark(usize);

impl ControlPlane {
    /// Where the audit log is now: [`ControlPlane::writes_since`] reads from here.
    pub fn audit_mark(&self) -> AuditMark {
        AuditMark(self.audit_events().len())
    }

    /// The audit log's events after `mark`.
    pub fn audit_events_since(&self, mark: AuditMark) -> Vec<serde_json::Value> {
        self.audit_events().into_iter().skip(mark.0).collect()
    }

    /// The writes (`create`, `update`, `patch`, `delete`) `user` made since `mark`,
    /// Lease renewals aside (a leader-elected process renews forever), as
    /// `verb resource namespace/name` lines.
    pub fn writes_since(&self, mark: AuditMark, user: &str) -> Vec<String> {
        self.audit_events_since(mark)
            .into_iter()
            .filter(|e| e["user"]["username"] == user)
            .filter(|e| {
                ["create", "update", "patch", "delete", "deletecollection"]
                    .contains(&e["verb"].as_str().unwrap_or_default())
            })
            .filter(|e| e["objectRef"]["resource"] != "leases")
            .map(|e| {
                let o = &e["objectRef"];
                format!(
                    "{} {}{} {}/{}",
                    e["verb"].as_str().unwrap_or_default(),
                    o["resource"].as_str().unwrap_or_default(),
                    o["subresource"]
                        .as_str()
                        .map(|s| format!("/{s}"))
                        .unwrap_or_default(),
                    o["namespace"].as_str().unwrap_or_default(),
                    o["name"].as_str().unwrap_or_default()
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::assets_in;

    #[test]
    fn assets_name_what_is_missing() {
        let e = assets_in(None).unwrap_err();
        assert!(e.contains("KUBEBUILDER_ASSETS is not set"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let e = assets_in(Some(dir.path().as_os_str())).unwrap_err();
        assert!(e.contains("has no etcd"), "{e}");
        for name in ["etcd", "kube-apiserver"] {
            std::fs::write(dir.path().join(name), "").unwrap();
        }
        let e = assets_in(Some(dir.path().as_os_str())).unwrap_err();
        assert!(e.contains("has no kube-controller-manager"), "{e}");
        std::fs::write(dir.path().join("kube-controller-manager"), "").unwrap();
        assert_eq!(assets_in(Some(dir.path().as_os_str())).unwrap(), dir.path());
    }
}
