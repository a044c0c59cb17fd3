//! The test kit's control plane outlives no test process: a child test process starts
//! one and is SIGKILLed (no destructor, no exit handler runs); the watchdog stops
//! etcd, kube-apiserver and kube-controller-manager by PID and removes their folder.
use std::path::Path;
use std::time::{Duration, Instant};

use tally_tests::kube::ControlPlane;
use tally_tests::kube::control_plane::assets;

/// Set for the child: the file it reports its control plane's PIDs and folder into.
const CHILD: &str = "TALLY_CONTROL_PLANE_CHILD";

const TEST: &str = "a_control_plane_stops_when_its_test_process_is_killed";

fn alive(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

#[test]
fn a_control_plane_stops_when_its_test_process_is_killed() {
    if let Some(report) = std::env::var_os(CHILD) {
        // The child: start a control plane, say where it is, then wait to be killed.
        let rt = tokio::runtime::Runtime::new().unwrap();
        let plane = rt
            .block_on(ControlPlane::shared())
            .expect("a control plane");
        let pids: Vec<String> = plane.pids().iter().map(u32::to_string).collect();
        let text = format!("{}\n{}\n", pids.join(" "), plane.dir.display());
        std::fs::write(Path::new(&report).with_extension("tmp"), text).unwrap();
        std::fs::rename(Path::new(&report).with_extension("tmp"), &report).unwrap();
        std::thread::sleep(Duration::from_secs(600));
        return;
    }
    if let Err(why) = assets() {
        tally_tests::skip(&format!("{TEST}: {why}"));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("plane");
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", TEST, "--nocapture"])
        .env(CHILD, &report)
        .env_remove("TALLY_KEEP_LOGS")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    while !report.exists() {
        assert!(
            Instant::now() < deadline && child.try_wait().unwrap().is_none(),
            "the child started no control plane"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let text = std::fs::read_to_string(&report).unwrap();
    let mut lines = text.lines();
    let pids: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    let folder = lines.next().unwrap().to_string();
    assert_eq!(
        pids.len(),
        3,
        "etcd, kube-apiserver, kube-controller-manager"
    );
    assert!(pids.iter().all(|p| alive(p)), "all three run");

    child.kill().unwrap();
    child.wait().unwrap();
    let killed = Instant::now();
    while pids.iter().any(|p| alive(p)) || Path::new(&folder).exists() {
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "30 s after the test process died: running {:?}, folder {folder} exists: {}",
            pids.iter().filter(|p| alive(p)).collect::<Vec<_>>(),
            Path::new(&folder).exists()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    tally_tests::say(&format!(
        "control plane stopped {:.1?} after its test process was SIGKILLed",
        killed.elapsed()
    ));
}
