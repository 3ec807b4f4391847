//! Policy programming latency at scale: a synthetic 10,000-pod / 1,000-policy cluster on 100
//! nodes (about 100 pods local to the measured node), kernel maps loaded for real. Each event
//! goes through the agent's own `Controller` (the code the watchers feed): state update,
//! incremental recompilation, map writes. Latency is measured from the event handed to the
//! controller to the last map write returning. Printed beside a full resync (recompile and
//! compare everything) in the same run, with the ratio. Run with `cargo xtask bench` (root).
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use netsieve::controller::{Controller, KubeObject, ObjectEvent, ObjectKind};
use netsieve::dataplane::kernel;
use netsieve::dataplane::maps::KernelMaps;
use netsieve::dataplane::sync::Capacity;
use netsieve::metrics::Metrics;
use netsieve::policy::PodInfo;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "common/synthetic.rs"]
mod synthetic;
use synthetic::{DEPLOYMENTS_PER_NAMESPACE, NAMESPACES, NODES, POLICIES_PER_NAMESPACE, REPLICAS, decode, namespace_json, pod_json, policy_json};

const NODE: &str = "node0";
const ROUNDS: usize = 200;

fn pod(v: Value) -> KubeObject {
    KubeObject::Pod(Box::new(decode::<Pod>(v)))
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    kernel::raise_memlock_rlimit();
    let rss_start = rss_kib();
    let mut ebpf = kernel::load()?.ebpf;
    let mut maps = KernelMaps::take_from(&mut ebpf)?;
    let metrics = Arc::new(Metrics::default());
    let mut controller = Controller::new(NODE, true, Capacity::default(), metrics.clone());
    // Stand-in interface indexes: the maps are real, nothing is attached.
    let interface_of = |p: &PodInfo| Some(1000 + (p.ips.first().map_or(0, |ip| match ip {
        std::net::IpAddr::V4(v4) => u32::from(*v4) & 0xffff,
        std::net::IpAddr::V6(_) => 0,
    })));

    let namespaces: Vec<KubeObject> =
        (0..NAMESPACES).map(|ns| KubeObject::Namespace(Box::new(decode::<Namespace>(namespace_json(ns, false))))).collect();
    let mut pods = Vec::new();
    for ns in 0..NAMESPACES {
        for d in 0..DEPLOYMENTS_PER_NAMESPACE {
            for r in 0..REPLICAS {
                pods.push(pod(pod_json(ns, d, r, "v1")));
            }
        }
    }
    let mut policies = Vec::new();
    for ns in 0..NAMESPACES {
        for i in 0..POLICIES_PER_NAMESPACE {
            policies.push(KubeObject::NetworkPolicy(Box::new(decode::<NetworkPolicy>(policy_json(ns, i, 8000)))));
        }
    }
    let (pod_count, policy_count) = (pods.len(), policies.len());
    let started = Instant::now();
    controller.apply_events(
        &mut maps,
        vec![
            ObjectEvent::Relisted(ObjectKind::Namespace, namespaces),
            ObjectEvent::Relisted(ObjectKind::Pod, pods),
            ObjectEvent::Relisted(ObjectKind::NetworkPolicy, policies),
        ],
        started,
        &interface_of,
    )?;
    let initial = started.elapsed();
    let counts = controller.sync.entry_counts();
    let local = controller.compiler.program().endpoints.len();
    let failed = controller.compiler.program().endpoints.values().filter(|e| e.fail_closed).count();
    println!(
        "netsieve control-plane benchmark: {pod_count} pods, {policy_count} policies, {} identities, {NODES} nodes; \
         {local} local endpoints ({failed} fail-closed), map entries: ipcache {}, identity {}, cidr {}, port {}",
        controller.compiler.identities().len(),
        controller.sync.ipcache_len(),
        counts.identity,
        counts.cidr,
        counts.port
    );
    println!("initial list to programmed maps: {:.1} ms", initial.as_secs_f64() * 1e3);

    let mut full = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        controller.full_resync(&mut maps, &interface_of)?;
        full.push(t.elapsed());
    }
    full.sort();
    let full_median = full[full.len() / 2];

    // Event kinds, each applied ROUNDS times and undone, one event per batch.
    type Make = Box<dyn Fn(usize) -> (ObjectEvent, ObjectEvent)>;
    let kinds: Vec<(&str, Make)> = vec![
        ("remote pod relabelled (existing identity)", Box::new(|i| {
            let (ns, d) = (1 + i % (NAMESPACES - 1), i % DEPLOYMENTS_PER_NAMESPACE);
            let mut moved = pod_json(ns, d, 1, "v1");
            moved["metadata"]["labels"]["app"] = json!(format!("app{}", (d + 1) % DEPLOYMENTS_PER_NAMESPACE));
            moved["metadata"]["labels"]["tier"] = json!(if (d + 1) % DEPLOYMENTS_PER_NAMESPACE < 5 { "front" } else { "back" });
            (ObjectEvent::Applied(pod(moved)), ObjectEvent::Applied(pod(pod_json(ns, d, 1, "v1"))))
        })),
        ("pod created and deleted", Box::new(|i| {
            let (ns, d) = (i % NAMESPACES, i % DEPLOYMENTS_PER_NAMESPACE);
            let mut extra = pod_json(ns, d, REPLICAS - 1, "v1");
            extra["metadata"]["name"] = json!(format!("surge-{i}"));
            extra["status"]["podIP"] = json!(format!("10.200.{}.{}", i / 256 % 256, i % 256));
            extra["status"]["podIPs"] = json!([{"ip": format!("10.200.{}.{}", i / 256 % 256, i % 256)}]);
            let deleted = ObjectEvent::Deleted(ObjectKind::Pod, Some(format!("ns{ns}")), format!("surge-{i}"));
            (ObjectEvent::Applied(pod(extra)), deleted)
        })),
        ("pod relabelled to a new identity (rollout)", Box::new(|i| {
            let (ns, d) = (i % NAMESPACES, i % DEPLOYMENTS_PER_NAMESPACE);
            (ObjectEvent::Applied(pod(pod_json(ns, d, 2, "v2"))), ObjectEvent::Applied(pod(pod_json(ns, d, 2, "v1"))))
        })),
        ("policy edited (port range)", Box::new(|i| {
            let ns = i % NAMESPACES;
            let index = 4 + i % (POLICIES_PER_NAMESPACE - 4);
            let edit = |port| ObjectEvent::Applied(KubeObject::NetworkPolicy(Box::new(decode::<NetworkPolicy>(policy_json(ns, index, port)))));
            (edit(9000), edit(8000))
        })),
        ("namespace changes team (selectors flip)", Box::new(|i| {
            let ns = 1 + i % (NAMESPACES - 1);
            let label = |moved| ObjectEvent::Applied(KubeObject::Namespace(Box::new(decode::<Namespace>(namespace_json(ns, moved)))));
            (label(true), label(false))
        })),
    ];
    println!();
    println!("{:<46} {:>10} {:>10} {:>10} {:>14}", "event (one per batch, applied then undone)", "p50 ms", "p99 ms", "max ms", "full/p50");
    let mut all = Vec::new();
    for (label, make) in &kinds {
        let mut samples = Vec::new();
        for i in 0..ROUNDS {
            let (apply, undo) = make(i);
            for event in [apply, undo] {
                let t = Instant::now();
                controller.apply_events(&mut maps, vec![event], t, &interface_of)?;
                samples.push(t.elapsed());
            }
        }
        samples.sort();
        let p50 = percentile(&samples, 0.5);
        println!(
            "{:<46} {:>10.3} {:>10.3} {:>10.3} {:>14.0}",
            label,
            p50.as_secs_f64() * 1e3,
            percentile(&samples, 0.99).as_secs_f64() * 1e3,
            samples.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
            full_median.as_secs_f64() / p50.as_secs_f64().max(1e-9)
        );
        all.extend(samples);
    }
    all.sort();
    let p50 = percentile(&all, 0.5);
    let p99 = percentile(&all, 0.99);
    println!(
        "{:<46} {:>10.3} {:>10.3} {:>10.3} {:>14.0}",
        format!("all {} events", all.len()),
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        all.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        full_median.as_secs_f64() / p50.as_secs_f64().max(1e-9)
    );
    println!("full resync (recompile + compare everything), median of 5: {:.1} ms", full_median.as_secs_f64() * 1e3);
    let rss = rss_kib();
    println!("resident memory: {} MiB (process; {} MiB before loading the cluster)", rss / 1024, rss_start / 1024);
    let verdict = if p99 <= Duration::from_millis(10) { "met" } else { "MISSED" };
    println!("goal p99 <= 10 ms from event to maps updated: {verdict} ({:.3} ms)", p99.as_secs_f64() * 1e3);
    Ok(())
}
