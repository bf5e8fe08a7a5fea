//! The emulator on this machine: real namespaces, TUN devices and TCP flows. Skips with a
//! printed reason where it cannot run (not root, no TUN, no iproute2).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use ferry_wan::measure::measure;
use ferry_wan::{Direction, Profile, Wan};

fn can_run() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let tun = std::path::Path::new("/dev/net/tun").exists();
    let ip = std::process::Command::new("ip").arg("-V").output().is_ok();
    if !(root && tun && ip) {
        eprintln!("skipped: needs root ({root}), /dev/net/tun ({tun}) and iproute2 ({ip})");
    }
    root && tun && ip
}

#[test]
fn a_shaped_delayed_link_never_beats_its_profile() {
    if !can_run() {
        return;
    }
    let wan = Wan::start(
        &format!("t{}", std::process::id()),
        Profile::named("wan").unwrap(),
        1500,
    )
    .unwrap();
    let m = measure(&wan, 10, 3.0, "cubic").unwrap();
    let r = wan.stop();
    eprintln!("{m:?}\n{r:?}");
    // Bounds the emulator guarantees whatever the machine's load: a round trip takes at
    // least the two one-way delays, and the flow cannot exceed the rate.
    assert!(m.rtt_min_ms >= 40.0, "{m:?}");
    assert!(m.tcp_mbps <= 100.0, "{m:?}");
    assert!(m.tcp_mbps > 0.0 && r.a_to_b.packets_out > 1000, "{r:?}");
    assert_eq!(r.a_to_b.lost, 0);
}

#[test]
fn random_loss_drops_about_the_share_asked_for() {
    if !can_run() {
        return;
    }
    let d = Direction {
        rate_bps: None,
        delay: Duration::from_millis(1),
        jitter: Duration::from_micros(200),
        loss: 0.05,
    };
    let wan = Wan::start(
        &format!("l{}", std::process::id()),
        Profile::symmetric(d),
        1500,
    )
    .unwrap();
    // 10,000 datagrams A→B, paced so no queue overflows.
    let sink = wan
        .b
        .enter(|| std::net::UdpSocket::bind((ferry_wan::ADDR_B, 0)))
        .unwrap()
        .unwrap();
    let to = sink.local_addr().unwrap();
    let src = wan
        .a
        .enter(|| std::net::UdpSocket::bind((ferry_wan::ADDR_A, 0)))
        .unwrap()
        .unwrap();
    for i in 0..10_000u32 {
        src.send_to(&i.to_le_bytes(), to).unwrap();
        if i % 100 == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    let r = wan.stop();
    let share = r.a_to_b.lost as f64 / r.a_to_b.packets_in as f64;
    eprintln!("{r:?} share {share}");
    assert!(r.a_to_b.packets_in >= 10_000, "{r:?}");
    assert_eq!(r.a_to_b.packets_out + r.a_to_b.lost, r.a_to_b.packets_in);
    // 5% of 10,000: within 4..6% (over 4 standard deviations).
    assert!((0.04..0.06).contains(&share), "{share}");
}
