//! The committed man pages match the CLI definitions they are generated
//! from. Regenerate with `scripts/gen-man`.

mod common;

use std::process::Command;

use common::*;

fn check(bin: &std::path::Path, tag: &str) {
    let dir = TempDir::new(tag);
    let st = Command::new(bin)
        .arg("man")
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(st.success());
    let man = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("man");
    let generated = dir.entries();
    assert!(!generated.is_empty());
    for name in generated {
        let fresh = std::fs::read(dir.join(&name)).unwrap();
        let committed = std::fs::read(man.join(&name))
            .unwrap_or_else(|_| panic!("man/{name} is missing: run scripts/gen-man"));
        assert!(
            fresh == committed,
            "man/{name} is stale: run scripts/gen-man"
        );
    }
}

#[test]
fn man_pages_are_current() {
    check(&procmig(), "man");
    // procmig-agent prints its single page to stdout.
    let out = Command::new(agent_bin()).arg("man").output().unwrap();
    assert!(out.status.success());
    let committed =
        std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("man/procmig-agent.1"))
            .unwrap();
    assert!(
        out.stdout == committed,
        "man/procmig-agent.1 is stale: run scripts/gen-man"
    );
}
