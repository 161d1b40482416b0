//! `GET /metrics` of the in-process daemon: the scrape asks the launcher for its running VMs'
//! VMM counters (here a real Firecracker metrics file, as `builder-vmm` reads it) and exports
//! them by build id next to the node's own series.

mod common;

use builder_vmm::firecracker::metrics::MetricsTotals;
use common::{Options, ScriptLauncher};

#[tokio::test]
async fn metrics_export_the_running_vms_firecracker_counters() {
    let dir = tempfile::tempdir().unwrap();
    let launcher = ScriptLauncher::new("exit 0");
    let d = common::start(dir.path(), launcher.clone(), Options::default()).await;
    let scrape = || async {
        let r = reqwest::get(format!("{}/metrics", d.base)).await.unwrap();
        assert_eq!(r.status(), 200);
        r.text().await.unwrap()
    };

    let text = scrape().await;
    assert!(text.contains("node_agent_running_vms 0\n"), "{text}");
    assert!(!text.contains("build_id="), "no VM, no VM series:\n{text}");

    let file = dir.path().join("metrics.json");
    std::fs::write(&file, include_str!("data/firecracker-metrics.jsonl")).unwrap();
    let totals = MetricsTotals::read(&file).unwrap();
    *launcher.vmm_metrics.lock().unwrap() = vec![("b-fc".into(), totals)];
    let text = scrape().await;
    for line in [
        "node_agent_vm_block_bytes_total{build_id=\"b-fc\",op=\"read\"} 0",
        "node_agent_vm_net_bytes_total{build_id=\"b-fc\",direction=\"rx\"} 0",
        "node_agent_vm_api_requests_total{build_id=\"b-fc\",method=\"PUT\"} 7",
        "node_agent_vm_seccomp_faults_total{build_id=\"b-fc\"} 0",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
    }
    assert!(text.contains("# TYPE node_agent_vm_vmm_failures_total counter\n"));
    d.stop().await;
}
