//! Whether a process can be restored: `procmig check`, and the check a
//! restore-bound `send` runs before it stops anything.

use super::fds::read_fds;

/// One line per reason process `pid` cannot be restored (empty: it can).
pub fn check(pid: i32) -> Result<Vec<String>, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|_| format!("no process with pid {pid}"))?;
    let mut why = Vec::new();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .map(str::trim)
            .unwrap_or("")
            .to_string()
    };
    let tracer = field("TracerPid:");
    // Tracing by procmig itself (a send in progress) is fine.
    let me = std::process::id().to_string();
    if tracer != "0" && !tracer.is_empty() && tracer != me {
        why.push(format!("it is traced by process {tracer} (a debugger?)"));
    }
    let children = children(pid);
    if !children.is_empty() {
        why.push(format!(
            "it has child processes ({}); only single processes are restored",
            children
                .iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    for ns in ["mnt", "pid", "net", "ipc", "uts", "user", "cgroup", "time"] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}"));
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}"));
        if let (Ok(t), Ok(o)) = (theirs, ours) {
            if t != o {
                why.push(format!(
                    "it is in another {ns} namespace than procmig; namespaces are not restored"
                ));
            }
        }
    }
    // What the restored process would gain or lose: a seccomp filter it
    // runs under, capabilities other than procmig's own (root) or any at
    // all (other users), a 32-bit program.
    if field("Seccomp:") != "0" && !field("Seccomp:").is_empty() {
        why.push("it runs under seccomp, whose filters are not restored".into());
    }
    let own = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let own_field = |k: &str| {
        own.lines()
            .find_map(|l| l.strip_prefix(k))
            .map(str::trim)
            .unwrap_or("")
            .to_string()
    };
    let root = field("Uid:").split_whitespace().nth(1) == Some("0");
    for cap in ["CapEff:", "CapPrm:", "CapBnd:", "CapAmb:", "CapInh:"] {
        let theirs = field(cap);
        let differs = if root {
            theirs != own_field(cap)
        } else {
            matches!(cap, "CapEff:" | "CapPrm:" | "CapAmb:")
                && !theirs.trim_start_matches('0').is_empty()
        };
        if differs {
            why.push(format!(
                "its capability set {} is {theirs}, which restore does not reproduce",
                cap.trim_end_matches(':')
            ));
        }
    }
    if let Ok(f) = std::fs::File::open(format!("/proc/{pid}/exe")) {
        use std::io::Read;
        let mut head = [0u8; 5];
        if f.take(5).read_exact(&mut head).is_ok() && head[..4] == *b"\x7fELF" && head[4] != 2 {
            why.push("it is a 32-bit program; only 64-bit ones are restored".into());
        }
    }
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map_err(|e| format!("cannot read /proc/{pid}/maps: {e}"))?;
    for line in maps.lines() {
        let name = line.split_whitespace().nth(5).unwrap_or("");
        if name.starts_with("/SYSV") {
            why.push(format!("it maps SysV shared memory ({name})"));
        } else if line.ends_with(" (deleted)")
            && !name.starts_with("/memfd:")
            && !name.starts_with("/dev/zero")
        {
            why.push(format!(
                "it maps a deleted file ({})",
                line.split_whitespace()
                    .skip(5)
                    .collect::<Vec<_>>()
                    .join(" ")
            ));
        }
    }
    let (_, refused) = read_fds(pid)?;
    why.extend(refused);
    why.dedup();
    Ok(why)
}

fn children(pid: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for t in dir.flatten() {
        let p = t.path().join("children");
        if let Ok(s) = std::fs::read_to_string(p) {
            out.extend(s.split_whitespace().filter_map(|w| w.parse::<i32>().ok()));
        }
    }
    out
}

/// What restoring needs: root (CAP_SYS_ADMIN, CAP_SYS_RESOURCE for
/// PR_SET_MM_MAP and CAP_CHECKPOINT_RESTORE for its exe link, CAP_SYS_PTRACE).
pub fn privileges() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return Ok(());
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let need = [
        (21, "CAP_SYS_ADMIN"),
        (24, "CAP_SYS_RESOURCE"),
        (19, "CAP_SYS_PTRACE"),
        (40, "CAP_CHECKPOINT_RESTORE"),
    ];
    let missing: Vec<&str> = need
        .iter()
        .filter(|(bit, _)| eff & (1u64 << bit) == 0)
        .map(|(_, n)| *n)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(format!(
        "restoring a process needs root, or {} (missing here)",
        missing.join(", ")
    ))
}
