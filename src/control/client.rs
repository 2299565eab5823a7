//! A QMP client for the shell commands: connect, negotiate, run one
//! command, return its `return` value (or the server's error).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

/// What went wrong talking to a QMP socket.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {path}: {reason} (is a migration running with --qmp?)")]
    Connect { path: String, reason: String },
    #[error("QMP socket {0}: {1}")]
    Io(String, String),
    #[error("{class}: {desc}")]
    Qmp { class: String, desc: String },
}

/// One negotiated connection.
pub struct Client {
    path: String,
    out: UnixStream,
    input: BufReader<UnixStream>,
}

impl Client {
    /// Connect and negotiate capabilities; every read waits `timeout` at
    /// most.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Client, ClientError> {
        let p = path.display().to_string();
        // A socket just created may not listen yet: refused connections are
        // tried again within the timeout.
        let deadline = std::time::Instant::now() + timeout;
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e)
                    if e.kind() == std::io::ErrorKind::ConnectionRefused
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    return Err(ClientError::Connect {
                        path: p.clone(),
                        reason: e.to_string(),
                    })
                }
            }
        };
        let io = |e: std::io::Error| ClientError::Io(p.clone(), e.to_string());
        s.set_read_timeout(Some(timeout)).map_err(io)?;
        s.set_write_timeout(Some(timeout)).map_err(io)?;
        let mut c = Client {
            path: p.clone(),
            out: s.try_clone().map_err(io)?,
            input: BufReader::new(s),
        };
        let greeting = c.read()?;
        if greeting.get("QMP").is_none() {
            return Err(ClientError::Io(
                p,
                format!("not a QMP greeting: {greeting}"),
            ));
        }
        c.execute("qmp_capabilities", json!({}))?;
        Ok(c)
    }

    fn read(&mut self) -> Result<Value, ClientError> {
        let mut line = String::new();
        let n = self
            .input
            .read_line(&mut line)
            .map_err(|e| ClientError::Io(self.path.clone(), e.to_string()))?;
        if n == 0 {
            return Err(ClientError::Io(
                self.path.clone(),
                "closed by the migration (it has ended)".into(),
            ));
        }
        serde_json::from_str(&line).map_err(|e| ClientError::Io(self.path.clone(), e.to_string()))
    }

    /// Run `command` with `arguments`; events met on the way are skipped.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, ClientError> {
        let mut msg = json!({"execute": command}).to_string();
        if arguments.as_object().is_some_and(|o| !o.is_empty()) {
            msg = json!({"execute": command, "arguments": arguments}).to_string();
        }
        msg.push('\n');
        self.out
            .write_all(msg.as_bytes())
            .map_err(|e| ClientError::Io(self.path.clone(), e.to_string()))?;
        loop {
            let v = self.read()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("?").to_string();
                return Err(ClientError::Qmp {
                    class: s("class"),
                    desc: s("desc"),
                });
            }
        }
    }
}
