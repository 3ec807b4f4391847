//! `netsieve explain` run as a user would: the built binary on the seed fixtures.
use std::path::PathBuf;
use std::process::Command;

fn fixtures(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn explain(dir: &str, from: &str, to: &str, port: &str, protocol: &str, extra: &[&str]) -> Run {
    let output = Command::new(env!("CARGO_BIN_EXE_netsieve"))
        .arg("explain")
        .arg("--manifests")
        .arg(fixtures(dir))
        .args(["--from", from, "--to", to, "--port", port, "--protocol", protocol])
        .args(extra)
        .output()
        .expect("netsieve runs");
    Run {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn json(run: &Run) -> serde_json::Value {
    serde_json::from_str(&run.stdout).expect("JSON output parses")
}

#[test]
fn iamnice_seed() {
    let denied = explain("iamnice", "default/interactivetest", "default/nginx-1", "80", "TCP", &[]);
    assert_eq!(denied.code, Some(1), "{}{}", denied.stdout, denied.stderr);
    assert!(denied.stdout.starts_with("DENIED"), "{}", denied.stdout);
    assert!(denied.stdout.contains("no rule of [default/access-nginx]"), "{}", denied.stdout);

    let allowed = explain("iamnice", "default/nice-client", "default/nginx-2", "80", "TCP", &[]);
    assert_eq!(allowed.code, Some(0), "{}{}", allowed.stdout, allowed.stderr);
    assert!(allowed.stdout.starts_with("ALLOWED"), "{}", allowed.stdout);
    assert!(allowed.stdout.contains("allowed by default/access-nginx ingress rule 0 (peer 0, any port)"), "{}", allowed.stdout);

    // Any port and protocol: the rule has no ports.
    assert_eq!(explain("iamnice", "default/nice-client", "default/nginx-1", "9999", "UDP", &[]).code, Some(0));
    // By IP, and from the node (kubelet probes) which is always allowed.
    assert_eq!(explain("iamnice", "10.244.1.20", "10.244.1.10", "80", "TCP", &[]).code, Some(1));
    let probe = explain("iamnice", "172.18.0.3", "default/nginx-1", "80", "TCP", &[]);
    assert_eq!(probe.code, Some(0), "{}", probe.stdout);
    assert!(probe.stdout.contains("exception"), "{}", probe.stdout);
    // nginx-2 runs on kind-worker2: kind-worker's address is not its node.
    assert_eq!(explain("iamnice", "172.18.0.3", "default/nginx-2", "80", "TCP", &[]).code, Some(1));
}

#[test]
fn cache_store_seed() {
    let blocked = explain("cache-store", "default/build-code", "secure-middleware/cache-store", "6379", "TCP", &[]);
    assert_eq!(blocked.code, Some(1), "{}", blocked.stdout);
    let allowed = explain("cache-store", "default/internal-proxy", "secure-middleware/cache-store", "6379", "TCP", &[]);
    assert_eq!(allowed.code, Some(0), "{}", allowed.stdout);
    assert!(allowed.stdout.contains("secure-middleware/cache-store-allow-ingress ingress rule 0 (peer 0, port entry 0)"));
    assert_eq!(explain("cache-store", "default/internal-proxy", "10.244.0.10", "6380", "TCP", &[]).code, Some(1));
    assert_eq!(explain("cache-store", "default/internal-proxy", "10.244.0.10", "6379", "UDP", &[]).code, Some(1));
    assert_eq!(
        explain("cache-store", "big-monolith/internal-proxy", "secure-middleware/cache-store", "6379", "TCP", &[]).code,
        Some(1),
        "same label, wrong namespace"
    );
    // Nothing restricts the other direction.
    assert_eq!(explain("cache-store", "secure-middleware/cache-store", "default/build-code", "22", "TCP", &[]).code, Some(0));
}

#[test]
fn three_tier_seed() {
    let cases = [
        ("203.0.113.5", "app/web", "80", 0),
        ("203.0.113.5", "app/web", "443", 1),
        ("app/web", "app/app", "8080", 0),
        ("app/web", "app/db", "5432", 1),
        ("app/app", "app/db", "5432", 0),
        ("app/app", "app/web", "80", 1),
        ("app/db", "203.0.113.5", "443", 0),
        ("app/web", "203.0.113.5", "443", 1),
    ];
    for (from, to, port, code) in cases {
        let run = explain("three-tier", from, to, port, "TCP", &[]);
        assert_eq!(run.code, Some(code), "{from} -> {to}:{port}\n{}{}", run.stdout, run.stderr);
    }
}

#[test]
fn default_deny_with_dns_seed() {
    assert_eq!(explain("default-deny-dns", "prod/api", "kube-system/coredns-1", "53", "UDP", &[]).code, Some(0));
    assert_eq!(explain("default-deny-dns", "prod/api", "kube-system/coredns-1", "53", "TCP", &[]).code, Some(0));
    assert_eq!(explain("default-deny-dns", "prod/api", "kube-system/coredns-1", "80", "TCP", &[]).code, Some(1));
    assert_eq!(explain("default-deny-dns", "prod/api", "default/fake-dns", "53", "UDP", &[]).code, Some(1));
    assert_eq!(explain("default-deny-dns", "prod/api", "prod/worker", "8080", "TCP", &[]).code, Some(1));
    assert_eq!(explain("default-deny-dns", "kube-system/coredns-1", "prod/api", "8080", "TCP", &[]).code, Some(1));
}

#[test]
fn json_output_for_scripts() {
    let run = explain("cache-store", "default/internal-proxy", "secure-middleware/cache-store", "6379", "TCP", &["--output", "json"]);
    assert_eq!(run.code, Some(0));
    let value = json(&run);
    assert_eq!(value["allowed"], true);
    assert_eq!(value["egress"]["isolated"], false);
    assert_eq!(value["ingress"]["isolated"], true);
    assert_eq!(value["ingress"]["matched"]["policy"], "secure-middleware/cache-store-allow-ingress");
    assert_eq!(value["ingress"]["selecting_policies"][0], "secure-middleware/cache-store-allow-ingress");
    let denied = explain("cache-store", "default/build-code", "secure-middleware/cache-store", "6379", "TCP", &["--output", "json"]);
    assert_eq!(denied.code, Some(1));
    assert_eq!(json(&denied)["allowed"], false);
    assert!(json(&denied)["ingress"]["matched"].is_null());
}

#[test]
fn errors_exit_2_with_one_line() {
    for (dir, from, to, port, protocol) in [
        ("cache-store", "default/nope", "default/build-code", "80", "TCP"),
        ("cache-store", "not-an-endpoint", "default/build-code", "80", "TCP"),
        ("no-such-dir", "1.2.3.4", "5.6.7.8", "80", "TCP"),
        ("cache-store", "1.2.3.4", "5.6.7.8", "80", "GRE"),
        ("cache-store", "1.2.3.4", "5.6.7.8", "99999", "TCP"),
    ] {
        let run = explain(dir, from, to, port, protocol, &[]);
        assert_eq!(run.code, Some(2), "{dir} {from} {to} {port} {protocol}: {}", run.stderr);
        assert!(run.stdout.is_empty(), "{}", run.stdout);
        assert!(!run.stderr.trim().is_empty());
    }
    let run = explain("cache-store", "default/nope", "default/build-code", "80", "TCP", &[]);
    assert_eq!(run.stderr.trim().lines().count(), 1, "{}", run.stderr);
}

#[test]
fn a_broken_document_is_reported_and_the_rest_loads() {
    // zz-broken.yaml: a Service (skipped), a NetworkPolicy that does not parse (reported with
    // file and document index), and a Pod after it that still loads: `late` is an
    // internal-proxy of default, so the seed policy admits it.
    let run = explain("broken", "default/late", "secure-middleware/cache-store", "6379", "TCP", &[]);
    assert_eq!(run.code, Some(0), "{}{}", run.stdout, run.stderr);
    assert!(run.stderr.contains("zz-broken.yaml: document 1:"), "{}", run.stderr);
    assert!(run.stderr.contains("NetworkPolicy"), "{}", run.stderr);
    let denied = explain("broken", "default/build-code", "secure-middleware/cache-store", "6379", "TCP", &[]);
    assert_eq!(denied.code, Some(1), "{}{}", denied.stdout, denied.stderr);
}
