//! The documented control API: the JSON Schema in `docs/control.schema.json` is what the
//! code accepts, and the Python example client drives real guests with it.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use std::path::Path;

/// Fails when a request changes without its documented schema: regenerate it with
/// `cargo run -p ferry -- control-schema > docs/control.schema.json` and describe the
/// change in docs/control.md.
#[test]
fn the_checked_in_schema_is_what_the_code_accepts() {
    let out = ferry().arg("control-schema").output().unwrap();
    assert!(out.status.success());
    let generated = String::from_utf8(out.stdout).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let documented = std::fs::read_to_string(root.join("docs/control.schema.json")).unwrap();
    assert_eq!(
        generated.trim(),
        documented.trim(),
        "docs/control.schema.json is out of date: regenerate it (`ferry control-schema`) and update docs/control.md"
    );
    // Every request the schema names is described in the document.
    let doc = std::fs::read_to_string(root.join("docs/control.md")).unwrap();
    let schema: serde_json::Value = serde_json::from_str(&generated).unwrap();
    for variant in schema["oneOf"].as_array().unwrap() {
        let op = variant["properties"]["op"]["const"].as_str().unwrap();
        assert!(
            doc.contains(&format!("### `{op}`")),
            "docs/control.md does not describe `{op}`"
        );
    }
}

/// `examples/ferry_control.py` migrates one guest, following its progress, and cancels
/// another's migration.
#[test]
fn the_python_client_migrates_one_guest_and_cancels_another() {
    let python = std::process::Command::new("python3")
        .arg("--version")
        .output();
    if python.is_err() {
        eprintln!("skipped: no python3 here");
        return;
    }
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let (mut src_a, ctl_a) = run_guest(a.path(), &[]);
    let (mut src_b, ctl_b) = run_guest(b.path(), &["--fill", "random"]);
    let (mut dst_a, addr_a, dst_ctl_a) = listen(a.path(), "10s");
    let (mut dst_b, addr_b, _) = listen(b.path(), "10s");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::process::Command::new("python3")
        .arg(root.join("examples/ferry_control.py"))
        .arg("--migrate")
        .arg(&ctl_a)
        .arg(&addr_a)
        .arg("--cancel")
        .arg(&ctl_b)
        .arg(&addr_b)
        .args(["--transport", "tcp", "--insecure"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("cancelled=True"), "{said}");
    assert!(said.contains("ok=True verified=True"), "{said}");
    assert_eq!(
        wait_exit(&mut src_a, std::time::Duration::from_secs(10)),
        Some(0)
    );
    assert_check_passes(&dst_ctl_a, "the guest the client migrated");
    assert_check_passes(&ctl_b, "the guest whose migration the client cancelled");
    assert_eq!(
        wait_exit(&mut dst_b, std::time::Duration::from_secs(10)),
        Some(1)
    );
    stop_and_wait(&mut dst_a, &dst_ctl_a);
    stop_and_wait(&mut src_b, &ctl_b);
}
