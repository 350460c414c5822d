//! The relay's layers, read from its sources: front doors never name the
//! mesh, the mesh never names a door or the router, local services name
//! neither, and the leaves (placement, keys, tls, metrics, limits, ocsp, offload) name nothing
//! above them. Only the crate root and `endpoint` compose doors and mesh.
//! And every task is owned: no bare `tokio::spawn` without a tracker.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("a source dir") {
        let p = e.expect("an entry").path();
        if p.is_dir() {
            out.extend(rust_files(&p));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out
}

fn src(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src").join(rel)
}

/// Every `crate::…` path of `files` that starts with one of `banned`.
fn offenders(files: &[PathBuf], banned: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(f).expect("a readable source");
        for (i, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for b in banned {
                if code.contains(&format!("crate::{b}"))
                    || code.contains(&format!("super::super::{b}"))
                {
                    out.push(format!("{}:{}: {}", f.display(), i + 1, line.trim()));
                }
            }
        }
    }
    out
}

#[test]
fn front_doors_never_name_the_mesh() {
    let files = rust_files(&src("doors"));
    assert!(files.len() >= 5, "the doors are where they should be");
    let bad = offenders(&files, &["mesh", "endpoint"]);
    assert!(bad.is_empty(), "a door names the mesh:\n{}", bad.join("\n"));
}

#[test]
fn the_mesh_never_names_a_door_or_the_router() {
    let files = rust_files(&src("mesh"));
    assert!(files.len() >= 7);
    let bad = offenders(&files, &["doors", "router", "endpoint"]);
    assert!(bad.is_empty(), "the mesh names a door:\n{}", bad.join("\n"));
}

#[test]
fn local_services_name_no_door_router_or_mesh() {
    let files = rust_files(&src("services"));
    assert!(files.len() >= 5);
    let bad = offenders(&files, &["doors", "router", "mesh", "endpoint"]);
    assert!(
        bad.is_empty(),
        "a service names a layer above it:\n{}",
        bad.join("\n")
    );
}

#[test]
fn leaves_name_nothing_above_them() {
    let files: Vec<PathBuf> = [
        "placement.rs",
        "keys.rs",
        "tls.rs",
        "metrics.rs",
        "limits.rs",
        "ocsp.rs",
        "offload.rs",
    ]
    .iter()
    .map(|f| src(f))
    .collect();
    let bad = offenders(&files, &["doors", "router", "mesh", "services", "endpoint"]);
    assert!(bad.is_empty(), "a leaf names a layer:\n{}", bad.join("\n"));
}

#[test]
fn every_spawned_task_is_tracked() {
    // A bare `tokio::spawn` whose future is not `track_future(..)`d is a
    // task nobody waits for at shutdown.
    let mut files = rust_files(&src(""));
    files.extend(rust_files(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../daemon/src"),
    ));
    let mut bad = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).expect("a readable source");
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            if code.contains("tokio::spawn(") || code.contains("tokio::task::spawn(") {
                let stmt = lines[i..(i + 4).min(lines.len())].join(" ");
                if !stmt.contains("track_future") {
                    bad.push(format!("{}:{}: {}", f.display(), i + 1, line.trim()));
                }
            }
        }
    }
    assert!(bad.is_empty(), "untracked tasks:\n{}", bad.join("\n"));
}
