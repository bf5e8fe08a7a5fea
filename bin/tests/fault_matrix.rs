//! The fault matrix: every `FERRY_FAULT` point × action × side, over `tcp` and `tls`, with
//! real processes. For every cell: never two running copies; while both processes live,
//! one copy runs or is held; an in-doubt destination is resolved as an operator would
//! (by asking the source), after which exactly one copy runs, advances and passes its
//! check; a discarded destination leaves no files; exit codes say what happened.
//!
//! The table of outcomes is printed (`cargo test -p ferry --test fault_matrix --
//! --nocapture`) and kept in `docs/safety.md`.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const POINTS: [&str; 10] = [
    "handshake",
    "storage",
    "memory",
    "pause",
    "state",
    "verified",
    "commit",
    "resumed",
    "postcopy",
    "verdict",
];
const ACTIONS: [&str; 3] = ["exit", "close", "stall"];
const SIDES: [&str; 2] = ["source", "dest"];

/// Transport flags of each side.
struct Peers {
    name: &'static str,
    src: Vec<String>,
    dst: Vec<String>,
}

fn peers(keys: &Path) -> Vec<Peers> {
    let (sc, sk, sfp) = keygen(keys, "src");
    let (dc, dk, dfp) = keygen(keys, "dst");
    let tls = |c: &str, k: &str, fp: &str| -> Vec<String> {
        ["--transport", "tls", "--cert", c, "--key", k, "--peer", fp]
            .map(String::from)
            .to_vec()
    };
    vec![
        Peers {
            name: "tcp",
            src: PLAIN.map(String::from).to_vec(),
            dst: PLAIN.map(String::from).to_vec(),
        },
        Peers {
            name: "tls",
            src: tls(&sc, &sk, &dfp),
            dst: tls(&dc, &dk, &sfp),
        },
    ]
}

/// What a process of the cell looks like once things settled.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Dead(Option<i32>),
    State(String),
}

impl Seen {
    fn state(&self) -> &str {
        match self {
            Seen::Dead(_) => "gone",
            Seen::State(s) => s,
        }
    }
}

fn observe(p: &mut Proc, ctl: &Path) -> Seen {
    if let Some(s) = p.0.try_wait().unwrap() {
        return Seen::Dead(s.code());
    }
    let out = ferry()
        .args(["status", "--json", "--vm"])
        .arg(ctl)
        .output()
        .unwrap();
    match serde_json::from_slice::<serde_json::Value>(&out.stdout) {
        // A destination still waiting for owed post-copy blocks or pages has not settled.
        Ok(v)
            if v["owed_blocks"].as_u64().unwrap_or(0) + v["owed_pages"].as_u64().unwrap_or(0)
                > 0
                && v["state"] == "running" =>
        {
            Seen::State("post-copy".into())
        }
        Ok(v) => Seen::State(v["state"].as_str().unwrap_or("?").to_string()),
        // The process is on its way out.
        Err(_) => match wait_exit(p, Duration::from_secs(5)) {
            Some(c) => Seen::Dead(Some(c)),
            None => Seen::State("unreachable".into()),
        },
    }
}

/// Waits until the destination settled: gone, or running / in doubt / held.
fn settle_dest(p: &mut Proc, ctl: &Path) -> Seen {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = observe(p, ctl);
        let settled = match &s {
            Seen::Dead(_) => true,
            Seen::State(st) => matches!(st.as_str(), "running" | "in-doubt" | "held"),
        };
        if settled || Instant::now() > deadline {
            return s;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the guest at `ctl` runs; false when it does not within `within`.
fn wait_running(ctl: &Path, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if status(ctl)["state"] == "running" {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

fn operator(req: &str, ctl: &Path) -> (bool, String) {
    let out = ferry()
        .args([req, "--json", "--vm"])
        .arg(ctl)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    (
        out.status.success(),
        v["message"].as_str().unwrap_or_default().to_string(),
    )
}

fn images_in(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// Runs one cell; returns its row of the table.
/// What moves after the hand-over in a cell.
#[derive(Clone, Copy, PartialEq, Eq)]
enum After {
    /// Nothing (pre-copy).
    Nothing,
    /// The last dirty disk blocks (`--storage-mode postcopy`).
    Blocks,
    /// All of memory (`--memory-mode postcopy`).
    Memory,
}

fn cell(side: &str, point: &str, action: &str, after: After, peers: &Peers) -> String {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let fault = format!("{side}:{point}:{action}");
    let env_for = |s: &str| -> Vec<(&str, &str)> {
        if s == side {
            vec![("FERRY_FAULT", fault.as_str())]
        } else {
            vec![]
        }
    };
    let (src_ctl, dst_ctl, dst_dir) = (d.join("src.sock"), d.join("dst.sock"), d.join("dst"));
    let mut src = run_guest_at(&d.join("src.img"), &src_ctl, &[], &env_for("source"));
    let dst_peer: Vec<&str> = peers.dst.iter().map(String::as_str).collect();
    let (mut dst, addr) = listen_in(
        &dst_dir,
        &dst_ctl,
        "2s",
        "127.0.0.1:0",
        &dst_peer,
        &env_for("dest"),
    );
    let mut mig = ferry();
    mig.args(["migrate", "--json", "--timeout", "2s"])
        .args(&peers.src)
        .arg("--vm")
        .arg(&src_ctl)
        .args(["--to", &addr]);
    match after {
        After::Nothing => {}
        After::Blocks => {
            mig.args(["--storage-mode", "postcopy"]);
        }
        After::Memory => {
            mig.args(["--memory-mode", "postcopy"]);
        }
    }
    let mut child = mig
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    let mig_code = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s.code();
        }
        assert!(
            Instant::now() < deadline,
            "{fault} {}: migrate hangs",
            peers.name
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut report = String::new();
    if let Some(mut o) = child.stdout.take() {
        use std::io::Read;
        let _ = o.read_to_string(&mut report);
    }
    let report: serde_json::Value = serde_json::from_str(&report).unwrap_or_default();
    let what = format!(
        "{fault}{} over {}",
        match after {
            After::Nothing => "",
            After::Blocks => " (storage post-copy)",
            After::Memory => " (memory post-copy)",
        },
        peers.name
    );

    let dst_seen = settle_dest(&mut dst, &dst_ctl);
    let src_seen = observe(&mut src, &src_ctl);
    let (mut s0, d0) = (src_seen.state().to_string(), dst_seen.state().to_string());
    let running = [&s0, &d0]
        .iter()
        .filter(|s| s.as_str() == "running")
        .count();
    let held = matches!(d0.as_str(), "in-doubt" | "held");
    assert!(running <= 1, "{what}: two running copies ({s0}, {d0})");
    let both_alive = !matches!(src_seen, Seen::Dead(_)) && !matches!(dst_seen, Seen::Dead(_));
    let dst_discarded = matches!(dst_seen, Seen::Dead(Some(1))) && action != "exit" || {
        matches!(dst_seen, Seen::Dead(Some(1))) && side == "source"
    };
    if both_alive {
        assert!(
            running + usize::from(held) >= 1,
            "{what}: no copy ({s0}, {d0})"
        );
    }
    if matches!(src_seen, Seen::State(_)) && matches!(dst_seen, Seen::Dead(_)) {
        // The destination is gone: the source must still own the guest unless it handed
        // over to a destination that died with it.
        assert!(
            s0 == "running" || (side == "dest" && action == "exit"),
            "{what}: destination gone and the source is {s0}"
        );
    }
    if s0 == "handed-over" || s0 == "migrated-away" {
        assert_eq!(
            report["source_state"], s0,
            "{what}: report and status agree"
        );
        assert_ne!(report["source_resumed"], true, "{what}: {report}");
    }
    if s0 == "handed-over" {
        // A handed-over source never migrates (and so never runs) the guest again.
        let again = migrate_with_timeout(&src_ctl, &addr, "2s");
        let r = json_of(&again);
        assert!(
            !again.status.success(),
            "{what}: a second migration was accepted"
        );
        let err = r["error"].as_str().unwrap_or_default();
        assert!(err.contains("handed-over"), "{what}: {err}");
    }
    if s0 == "running" && matches!(dst_seen, Seen::Dead(_)) {
        assert_ne!(
            mig_code,
            Some(0),
            "{what}: a failed migration exits non-zero"
        );
    }
    if dst_discarded {
        let left: Vec<_> = images_in(&dst_dir);
        assert!(
            left.is_empty(),
            "{what}: a discarded destination left {left:?}"
        );
    }

    // The operator resolves what is held, asking the source first.
    let mut resolution = String::new();
    let mut d1 = d0.clone();
    // A source that reconnected and recovered its post-copy has returned as soon as the
    // destination confirmed; the destination then runs the guest again a moment later.
    if (d0 == "in-doubt" || d0 == "held")
        && s0 == "migrated-away"
        && wait_running(&dst_ctl, Duration::from_secs(10))
    {
        resolution = " → recovered by the source → runs".into();
        d1 = "running".into();
    } else if d0 == "in-doubt" || d0 == "held" {
        let take = match s0.as_str() {
            "running" => "discard",
            _ => "resume",
        };
        let (ok, msg) = operator(take, &dst_ctl);
        if ok {
            resolution = format!(" → operator: {take}");
            d1 = if take == "resume" {
                "running".into()
            } else {
                assert_eq!(wait_exit(&mut dst, Duration::from_secs(10)), Some(1));
                let left = images_in(&dst_dir);
                assert!(left.is_empty(), "{what}: discard left {left:?}");
                "gone".into()
            };
        } else {
            assert!(
                msg.contains("owed"),
                "{what}: the operator's {take} was refused: {msg}"
            );
            resolution = format!(" → {take} refused (units owed)");
            let lost = after == After::Memory && s0 != "handed-over";
            if lost {
                // Memory that never arrived lived only in the source process: with it
                // gone the guest is lost, and the destination keeps it paused and says so
                // rather than run it with holes.
                let st = status(&dst_ctl);
                assert!(
                    st["owed_pages"].as_u64().unwrap_or(0) > 0,
                    "{what}: held without owed pages: {st}"
                );
                assert!(
                    matches!(st["state"].as_str(), Some("held" | "in-doubt")),
                    "{what}: {st}"
                );
                resolution.push_str(" → lost with the source (pages owed), kept paused");
            }
            // Post-copy recovery: the handed-over source pushes what is still owed, or,
            // the source process gone, the image it left does; then the guest can run.
            let recover = |from: &[&str]| {
                ferry()
                    .args(["migrate", "--json", "--recover", "--timeout", "5s"])
                    .args(&peers.src)
                    .args(from)
                    .args(["--to", &addr])
                    .output()
                    .unwrap()
            };
            let image = d.join("src.img");
            let image = image.to_str().unwrap();
            // A live, handed-over source reconnects by itself within its --timeout, and a
            // recovered destination runs the guest again.
            let reconnected =
                s0 == "handed-over" && wait_running(&dst_ctl, Duration::from_secs(20));
            let out = if lost || reconnected {
                None
            } else if s0 == "handed-over" {
                Some(recover(&["--vm", src_ctl.to_str().unwrap()]))
            } else {
                let id = status(&dst_ctl)["last_migration"]["migration_id"]
                    .as_str()
                    .unwrap()
                    .to_string();
                // Another migration's id is refused, and changes nothing.
                let wrong = recover(&["--disk", image, "--migration-id", &"0".repeat(32)]);
                assert!(
                    !wrong.status.success(),
                    "{what}: a wrong migration id was taken"
                );
                Some(recover(&["--disk", image, "--migration-id", &id]))
            };
            if let Some(out) = out {
                let r = json_of(&out);
                assert!(out.status.success(), "{what}: recovery failed: {r}");
                assert_eq!(r["source_state"], "migrated-away", "{what}");
                assert!(
                    wait_running(&dst_ctl, Duration::from_secs(10)),
                    "{what}: the destination does not run after its recovery"
                );
                resolution.push_str(if s0 == "handed-over" {
                    " → source: --recover → runs"
                } else {
                    " → the source's image: --recover → runs"
                });
                d1 = "running".into();
            }
            if reconnected {
                resolution.push_str(" → the source reconnected → runs");
                d1 = "running".into();
            }
        }
    }
    let running_after = [&s0, &d1]
        .iter()
        .filter(|s| s.as_str() == "running")
        .count();
    assert!(
        running_after <= 1,
        "{what}: two running copies after the operator"
    );
    if s0 == "running" {
        assert_advancing(&src_ctl, &format!("{what}: resumed source"));
        assert_check_passes(&src_ctl, &format!("{what}: resumed source"));
    }
    if d1 == "running" {
        assert_advancing(&dst_ctl, &format!("{what}: destination"));
        assert_check_passes(&dst_ctl, &format!("{what}: destination"));
    }
    let code = |c: Option<i32>| c.map_or("signal".to_string(), |c| c.to_string());
    let reconnects = report["postcopy_reconnects"].as_u64().unwrap_or(0);
    if reconnects > 0 {
        s0.push_str(" (reconnected)");
    }
    format!(
        "| `{fault}`{} | {} | {s0} | {d0}{resolution} | {} |",
        match after {
            After::Blocks if point != "postcopy" => " (post-copy)",
            After::Memory => " (memory post-copy)",
            _ => "",
        },
        peers.name,
        code(mig_code)
    )
}

#[test]
fn every_fault_leaves_exactly_one_copy() {
    let keys = tempfile::tempdir().unwrap();
    let peers = peers(keys.path());
    let mut cells = Vec::new();
    for p in &peers {
        for side in SIDES {
            for point in POINTS {
                for action in ACTIONS {
                    let after = if point == "postcopy" {
                        After::Blocks
                    } else {
                        After::Nothing
                    };
                    cells.push((side, point, action, after, p));
                }
            }
        }
    }
    // Around the hand-over with blocks owed: the in-doubt guest owes blocks too.
    for (side, point, action) in [
        ("source", "commit", "exit"),
        ("source", "verified", "close"),
        ("dest", "verified", "stall"),
        ("dest", "commit", "close"),
    ] {
        cells.push((side, point, action, After::Blocks, &peers[0]));
    }
    // Memory post-copy around and after the hand-over: neither side has the whole VM.
    for side in SIDES {
        for point in ["verified", "commit", "resumed", "postcopy"] {
            for action in ACTIONS {
                cells.push((side, point, action, After::Memory, &peers[0]));
            }
        }
    }
    let rows = Mutex::new(Vec::new());
    let failures = Mutex::new(Vec::new());
    let next = Mutex::new(cells.into_iter());
    std::thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| loop {
                let Some((side, point, action, after, p)) = next.lock().unwrap().next() else {
                    return;
                };
                // Every cell runs; failures are gathered and reported together.
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    cell(side, point, action, after, p)
                })) {
                    Ok(row) => rows.lock().unwrap().push(row),
                    Err(e) => {
                        let msg = e
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_default();
                        failures.lock().unwrap().push(msg);
                    }
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    assert!(
        failures.is_empty(),
        "{} cells failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    let mut rows = rows.into_inner().unwrap();
    rows.sort();
    println!("| fault | transport | source after | destination after | `ferry migrate` exit |");
    println!("|---|---|---|---|---|");
    for r in &rows {
        println!("{r}");
    }
    assert_eq!(rows.len(), 148);
}
