//! Interface discovery over rtnetlink against this kernel, inside a network namespace of its
//! own: a new pod interface (veth + host route, as ptp lays it out) is seen within
//! milliseconds of the route appearing, and a notification overrun (a tiny socket buffer
//! flooded with route changes) is reported as such and repaired by a fresh dump. Needs root;
//! touches nothing outside the namespace it creates.
use netsieve::dataplane::discovery::{self, Drained, InterfaceIndex, Watcher};
use netsieve_tests::netns::{Cluster, in_netns, ip};
use std::net::IpAddr;
use std::time::{Duration, Instant};

fn placed(tables: &discovery::Tables, address: &str) -> Option<u32> {
    let ip: IpAddr = address.parse().expect("ip");
    InterfaceIndex::from_tables(tables).interface_for(&[ip]).map(|i| i.ifindex)
}

#[test]
fn a_new_pod_interface_is_seen_within_milliseconds() {
    let cluster = Cluster::new("disc", 1, &[]).expect("namespace");
    let netns = cluster.nodes[0].netns.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let watcher = in_netns(&netns, move || {
        let mut watcher = Watcher::subscribe().expect("subscribe");
        let mut tables = discovery::dump().expect("dump");
        assert_eq!(placed(&tables, "10.77.0.5"), None);
        ready_tx.send(()).expect("ready");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if watcher.wait(Duration::from_millis(100)).expect("wait") {
                watcher.drain(&mut tables).expect("drain");
                if let Some(ifindex) = placed(&tables, "10.77.0.5") {
                    let seen = Instant::now();
                    return Some((ifindex, seen));
                }
            }
        }
        None
    })
    .expect("netns");
    ready_rx.recv_timeout(Duration::from_secs(5)).expect("watcher ready");
    ip(Some(&netns), &["link", "add", "hdisc0", "type", "veth", "peer", "name", "pdisc0"]).expect("veth");
    ip(Some(&netns), &["link", "set", "hdisc0", "up"]).expect("up");
    let command_started = Instant::now();
    ip(Some(&netns), &["route", "add", "10.77.0.5/32", "dev", "hdisc0", "scope", "link"]).expect("route");
    let command_returned = Instant::now();
    let (_, seen) = watcher.join().expect("thread").expect("netns").expect("the route was never reported");
    // An upper bound (it includes starting `ip`), and the time after `ip` returned (0: placed
    // before the process had even exited).
    let bound = seen.saturating_duration_since(command_started);
    eprintln!(
        "RESULT new pod interface placed {bound:?} after `ip route add` started ({:?} for the command itself), {:?} after it returned",
        command_returned - command_started,
        seen.saturating_duration_since(command_returned)
    );
    assert!(bound < Duration::from_millis(500), "placed after {bound:?}");
}

#[test]
fn an_overrun_is_repaired_by_a_dump() {
    let cluster = Cluster::new("overrun", 1, &[]).expect("namespace");
    let netns = cluster.nodes[0].netns.clone();
    ip(Some(&netns), &["link", "add", "hover0", "type", "veth", "peer", "name", "pover0"]).expect("veth");
    ip(Some(&netns), &["link", "set", "hover0", "up"]).expect("up");
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (flooded_tx, flooded_rx) = std::sync::mpsc::channel();
    let watcher = in_netns(&netns, move || {
        // The smallest buffer the kernel allows: a few notifications fill it.
        let mut watcher = Watcher::subscribe_with_buffer(1).expect("subscribe");
        let mut tables = discovery::dump().expect("dump");
        ready_tx.send(()).expect("ready");
        flooded_rx.recv_timeout(Duration::from_secs(30)).expect("flooded");
        let outcome = watcher.drain(&mut tables).expect("drain");
        let before_dump = (1..=400).filter(|i| placed(&tables, &format!("10.78.{}.{}", i / 200, i % 200 + 1)).is_some()).count();
        let fresh = discovery::dump().expect("dump after the overrun");
        let after_dump = (1..=400).filter(|i| placed(&fresh, &format!("10.78.{}.{}", i / 200, i % 200 + 1)).is_some()).count();
        (outcome, before_dump, after_dump)
    })
    .expect("netns");
    ready_rx.recv_timeout(Duration::from_secs(5)).expect("watcher ready");
    // 400 host routes in one `ip -batch` process, while the watcher does not read.
    let batch: String = (1..=400).map(|i| format!("route add 10.78.{}.{}/32 dev hover0 scope link\n", i / 200, i % 200 + 1)).collect();
    let path = std::env::temp_dir().join(format!("netsieve-overrun-{}.batch", cluster.id));
    std::fs::write(&path, batch).expect("batch file");
    ip(Some(&netns), &["-batch", path.to_str().expect("path")]).expect("routes");
    let _ = std::fs::remove_file(&path);
    flooded_tx.send(()).expect("flooded");
    let (outcome, before_dump, after_dump) = watcher.join().expect("thread").expect("netns");
    eprintln!("RESULT overrun: drain said {outcome:?}; {before_dump} of 400 routes from notifications, {after_dump} after the dump");
    assert_eq!(outcome, Drained::NeedsDump, "the overrun is reported");
    assert!(before_dump < 400, "notifications were lost");
    assert_eq!(after_dump, 400, "the dump repairs the tables");
}
