//! TLS 1.3 with mutual authentication, tried as QEMU's TLS tests try it:
//! good credentials migrate; a wrong host name, a client left out of the
//! authorisation list, an anonymous client, a client of another CA and a
//! plaintext sender are each refused with one line on both sides, the
//! source runs on, and the receiver keeps listening for the real sender.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

/// `scripts/tls-certs` into `dir` (None when openssl is missing).
fn certs(dir: &Path, extra: &[&str]) -> Option<PathBuf> {
    if Command::new("openssl").arg("version").output().is_err() {
        println!("skipped: openssl is not installed (scripts/setup installs it)");
        return None;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/tls-certs");
    let out = Command::new(script)
        .args(extra)
        .arg(dir)
        .args(["localhost", "127.0.0.1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "tls-certs: {}", text(&out.stderr));
    Some(dir.to_path_buf())
}

fn send_to(agent: &Agent, addr: &str, extra: &[&str]) -> Output {
    let pid = agent.pid.to_string();
    let mut args = vec!["send", "--pid", &pid, "--to", addr, "--timeout", "10s"];
    args.extend_from_slice(extra);
    run(&args)
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn refused(out: &Output, needle: &str, agent: &Agent) {
    assert_one_line_error(out, needle);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert_running(agent.pid);
}

#[test]
fn mutual_tls_lets_in_only_the_authorised_client() {
    let dir = TempDir::new("tls");
    let Some(good) = certs(&dir.join("good"), &[]) else {
        return;
    };
    let other = certs(
        &dir.join("other"),
        &["--ca", good.to_str().unwrap(), "--client-cn", "intruder"],
    )
    .unwrap();
    let foreign = certs(&dir.join("foreign"), &[]).unwrap();
    let anonymous = dir.join("anonymous");
    std::fs::create_dir_all(&anonymous).unwrap();
    std::fs::copy(good.join("ca-cert.pem"), anonymous.join("ca-cert.pem")).unwrap();
    let authz = dir.join("authz");
    std::fs::write(&authz, "CN=client,O=procmig\n").unwrap();

    let recv = Recv::start(
        &dir.join("img"),
        &[
            "--tls-creds",
            good.to_str().unwrap(),
            "--tls-authz",
            authz.to_str().unwrap(),
            "--timeout",
            "10s",
        ],
    );
    let agent = Agent::start(&["--size", "16M"]);
    let tls = |d: &Path| ["--tls-creds".to_string(), d.to_str().unwrap().to_string()];
    // The receiver's certificate is not for this name.
    let mut args = tls(&good).to_vec();
    args.extend(["--tls-hostname".into(), "wrong.example".into()]);
    let out = send_to(&agent, &recv.addr(), &strs(&args));
    refused(&out, "not valid for name", &agent);
    // A certificate from the right CA, but not in the list.
    let out = send_to(&agent, &recv.addr(), &strs(&tls(&other)));
    refused(&out, "not in the --tls-authz list", &agent);
    // No certificate at all.
    let out = send_to(&agent, &recv.addr(), &strs(&tls(&anonymous)));
    refused(&out, "alert", &agent);
    // A certificate from another CA (which the sender also trusts for
    // the receiver: it is refused by the receiver, not by itself).
    std::fs::copy(good.join("ca-cert.pem"), foreign.join("ca-cert.pem")).unwrap();
    let out = send_to(&agent, &recv.addr(), &strs(&tls(&foreign)));
    refused(&out, "alert", &agent);
    // Plain TCP.
    let out = send_to(&agent, &recv.addr(), &[]);
    refused(&out, "expects --tls-creds", &agent);
    // Nothing was written, and the real sender still gets through.
    assert!(!dir.join("img").exists());
    let out = send_to(
        &agent,
        &format!("localhost:{}", recv.port),
        &strs(&tls(&good)),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("link: TLS 1.3 to CN=localhost,O=procmig"),
        "{}",
        text(&out.stdout)
    );
    let (ok, stdout, err) = recv.wait();
    assert!(ok, "{err}");
    assert!(
        stdout.contains("over TLS 1.3 as CN=client,O=procmig"),
        "{stdout}"
    );
    let rejected: Vec<&str> = err.lines().filter(|l| l.contains("rejected")).collect();
    assert_eq!(rejected.len(), 5, "{err}");
    for (line, why) in rejected.iter().zip([
        "TLS handshake failed",
        "not in the --tls-authz list",
        "TLS handshake failed",
        "TLS handshake failed",
        "does not speak TLS",
    ]) {
        assert!(line.contains(why), "{line:?} does not say {why:?}");
    }
    check_image(&agent, &dir.join("img"), "TLS migration");
}

#[test]
fn a_tls_sender_against_a_plain_receiver_is_told_so() {
    let dir = TempDir::new("tls-plain");
    let Some(good) = certs(&dir.join("good"), &[]) else {
        return;
    };
    let recv = Recv::start(&dir.join("img"), &["--timeout", "10s"]);
    let agent = Agent::start(&["--size", "4M"]);
    let out = send_to(
        &agent,
        &recv.addr(),
        &["--tls-creds", good.to_str().unwrap()],
    );
    refused(&out, "TLS handshake failed", &agent);
    let mut recv = recv;
    let _ = recv.child.kill();
    let (_, _, err) = recv.wait();
    assert!(
        err.contains("a TLS client, and this receiver has no --tls-creds"),
        "{err}"
    );
    assert!(!dir.join("img").exists());
}

#[test]
fn bad_credentials_are_one_line_before_anything_starts() {
    let dir = TempDir::new("tls-bad");
    let out = run(&[
        "recv",
        "--listen",
        "0",
        "--out",
        dir.join("img").to_str().unwrap(),
        "--tls-creds",
        dir.join("missing").to_str().unwrap(),
    ]);
    assert_one_line_error(&out, "missing/ca-cert.pem");
    let agent = Agent::start(&["--size", "4M"]);
    let out = send_to(&agent, "127.0.0.1:1", &["--tls-creds", "/nonexistent"]);
    assert_one_line_error(&out, "/nonexistent/ca-cert.pem");
    assert_running(agent.pid);
    let out = run(&["recv", "--listen", "0", "--out", "x", "--tls-authz", "f"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("--tls-creds"),
        "{}",
        text(&out.stderr)
    );
}
