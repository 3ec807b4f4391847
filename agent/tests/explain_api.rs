//! `netsieve explain --kubeconfig`: the built binary asks the in-process API server
//! (`netsieve_tests::fake_apiserver`, on loopback) holding each seed fixture, and must answer
//! exactly as `explain --manifests` does on the same fixture, flow by flow (exit status and the
//! whole JSON verdict).
use netsieve_tests::fake_apiserver::FakeApiServer;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// (exit status, JSON verdict without the source-specific error list).
fn explain(source: &[&str], from: &str, to: &str, port: &str, protocol: &str) -> (Option<i32>, Value) {
    let output = Command::new(env!("CARGO_BIN_EXE_netsieve"))
        .arg("explain")
        .args(source)
        .args(["--from", from, "--to", to, "--port", port, "--protocol", protocol, "--output", "json"])
        .output()
        .expect("netsieve runs");
    let mut verdict: Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|_| json!({"stderr": String::from_utf8_lossy(&output.stderr)}));
    if let Some(map) = verdict.as_object_mut() {
        map.remove("manifest_errors");
    }
    (output.status.code(), verdict)
}

#[test]
fn explain_from_the_api_answers_like_explain_from_manifests() {
    let mut compared = 0;
    for fixture in ["iamnice", "cache-store", "three-tier", "default-deny-dns"] {
        let dir = fixtures(fixture);
        let loaded = netsieve::manifests::load_dir(&dir).expect("fixture loads");
        assert!(loaded.errors.is_empty(), "{fixture}: {:?}", loaded.errors);
        let state = loaded.cluster_state();
        let api = FakeApiServer::start(vec![std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback")]).expect("api");
        // A real cluster has every namespace as an object, with its automatic name label.
        for (name, labels) in &state.namespaces {
            api.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}));
        }
        for pod in &loaded.pods {
            api.apply(serde_json::to_value(pod).expect("pod serialises"));
        }
        for policy in &loaded.policies {
            api.apply(serde_json::to_value(policy).expect("policy serialises"));
        }
        let kubeconfig = std::env::temp_dir().join(format!("netsieve-explain-api-{}-{fixture}", std::process::id()));
        std::fs::write(&kubeconfig, FakeApiServer::kubeconfig(api.addrs[0])).expect("kubeconfig");
        let from_manifests = ["--manifests", dir.to_str().expect("utf-8 path")];
        let from_api = ["--kubeconfig", kubeconfig.to_str().expect("utf-8 path")];
        let pods: Vec<&String> = state.pods.keys().collect();
        for from in &pods {
            for to in pods.iter().filter(|t| *t != from) {
                for (port, protocol) in [("80", "TCP"), ("53", "UDP"), ("6379", "TCP"), ("5432", "TCP")] {
                    let expected = explain(&from_manifests, from, to, port, protocol);
                    let got = explain(&from_api, from, to, port, protocol);
                    assert!(matches!(expected.0, Some(0 | 1)), "{fixture} {from} -> {to}: {:?}", expected.1);
                    assert_eq!(got, expected, "{fixture}: {from} -> {to}:{port}/{protocol}");
                    compared += 1;
                }
            }
        }
        let _ = std::fs::remove_file(Path::new(&kubeconfig));
    }
    assert!(compared > 100, "only {compared} flows compared");
    eprintln!("{compared} flows: --kubeconfig and --manifests agree");
}

#[test]
fn explain_without_a_source_or_with_an_unreachable_api_is_an_error() {
    let output = Command::new(env!("CARGO_BIN_EXE_netsieve"))
        .args(["explain", "--from", "1.2.3.4", "--to", "5.6.7.8", "--port", "80"])
        .output()
        .expect("netsieve runs");
    assert_eq!(output.status.code(), Some(2));
    // A port on loopback nobody listens on: exit 2 with one error line.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let kubeconfig = std::env::temp_dir().join(format!("netsieve-explain-api-{}-down", std::process::id()));
    std::fs::write(&kubeconfig, FakeApiServer::kubeconfig(addr)).expect("kubeconfig");
    let output = Command::new(env!("CARGO_BIN_EXE_netsieve"))
        .args(["explain", "--kubeconfig"])
        .arg(&kubeconfig)
        .args(["--from", "1.2.3.4", "--to", "5.6.7.8", "--port", "80"])
        .output()
        .expect("netsieve runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.starts_with("error: listing namespaces"), "{stderr}");
    let _ = std::fs::remove_file(&kubeconfig);
}
