//! Drives the real `atrest server` binary: create a server in a temp
//! directory, start it on an ephemeral port, talk to it with real clients.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const PASSWORD: &str = "correct horse battery staple";

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_atrest"))
}

/// A tool the tests need; scripts/setup-test-deps.sh installs it.
pub fn tool(name: &str) -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("{name} is not installed: run scripts/setup-test-deps.sh (scripts/test.sh does)");
}

/// The Python of the test venv (with psycopg).
pub fn python() -> PathBuf {
    if let Ok(p) = std::env::var("ATREST_TEST_PYTHON") {
        if Path::new(&p).exists() {
            return PathBuf::from(p);
        }
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    assert!(
        venv.exists(),
        "no Python test venv: run scripts/setup-test-deps.sh (scripts/test.sh does)"
    );
    venv
}

pub struct TestServer {
    pub tmp: tempfile::TempDir,
    pub dir: PathBuf,
    pub keystore: PathBuf,
    child: Option<Child>,
    pub port: u16,
    pub metrics_port: u16,
    pub log: PathBuf,
}

pub fn atrest(args: &[&str]) -> Output {
    Command::new(bin()).args(args).output().expect("run atrest")
}

/// Sends signal number `sig` to process `pid`.
pub fn signal_pid(pid: u32, sig: i32) -> rustix::io::Result<()> {
    use rustix::process::{kill_process, Pid, Signal};
    let sig = Signal::from_named_raw(sig).expect("a named signal");
    kill_process(Pid::from_raw(pid as i32).expect("a pid"), sig)
}

/// `atrest ARGS`, which must succeed; its standard output.
pub fn atrest_ok(args: &[&str]) -> String {
    let out = atrest(args);
    assert!(
        out.status.success(),
        "atrest {args:?} ended with {:?}: {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The real pgbench running `script` (written next to the server) on
/// database postgres over verified TLS: `clients` clients, `txns` each.
pub fn pgbench_script(
    s: &TestServer,
    script: &str,
    clients: u32,
    txns: u32,
) -> std::process::Child {
    let path = s.tmp.path().join("bench.sql");
    std::fs::write(&path, script).unwrap();
    Command::new(tool("pgbench"))
        .args(["-n", "-f", path.to_str().unwrap(), "-M", "prepared"])
        .args(["-c", &clients.to_string(), "-j", "2"])
        .args(["-t", &txns.to_string()])
        .arg(
            s.conninfo("postgres", "verify-full")
                .replace("host=127.0.0.1", "host=localhost"),
        )
        .env("PGPASSWORD", PASSWORD)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

impl TestServer {
    /// Creates a server (admin user `atrest`, password [`PASSWORD`]).
    pub fn create(extra: &[&str]) -> TestServer {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("server");
        let keystore = tmp.path().join("keystore");
        let pw = tmp.path().join("pw");
        std::fs::write(&pw, format!("{PASSWORD}\n")).unwrap();
        let mut args = vec![
            "server",
            "create",
            "--name",
            "test-server",
            "--data",
            dir.to_str().unwrap(),
            "--keystore",
            keystore.to_str().unwrap(),
            "--admin-password-file",
            pw.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ];
        args.extend_from_slice(extra);
        let out = atrest(&args);
        assert!(
            out.status.success(),
            "create failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let log = tmp.path().join("server.log");
        TestServer {
            tmp,
            dir,
            keystore,
            child: None,
            port: 0,
            metrics_port: 0,
            log,
        }
    }

    /// A server directory made some other way (a restore), not started.
    pub fn existing(dir: PathBuf, keystore: PathBuf) -> TestServer {
        let tmp = tempfile::tempdir().unwrap();
        let log = tmp.path().join("server.log");
        TestServer {
            tmp,
            dir,
            keystore,
            child: None,
            port: 0,
            metrics_port: 0,
            log,
        }
    }

    pub fn start(&mut self, extra: &[&str]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut args = vec![
            "server".to_string(),
            "start".into(),
            "--data".into(),
            self.dir.to_str().unwrap().into(),
            "--metrics-listen".into(),
            "127.0.0.1:0".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = Command::new(bin())
            .args(&args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(text) = std::fs::read_to_string(self.dir.join("state.json")) {
                let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                // Serving: Ready, or Inaccessible (a customer key that
                // cannot be used; the server still answers, with an error).
                let serving = v["state"] == "Ready" || v["state"] == "Inaccessible";
                if serving && v["pid"] == self.child.as_ref().unwrap().id() {
                    let port = |k: &str| {
                        v[k].as_str()
                            .and_then(|a| a.rsplit(':').next())
                            .and_then(|p| p.parse().ok())
                            .unwrap_or(0)
                    };
                    self.port = port("listen");
                    self.metrics_port = port("metrics");
                    return;
                }
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("server exited ({st}) during start:\n{}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "server did not become Ready:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("tls/ca.crt")
    }

    /// A libpq connection string.
    pub fn conninfo(&self, db: &str, sslmode: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=atrest dbname={db} sslmode={sslmode} sslrootcert={} connect_timeout=10",
            self.port,
            self.ca().display()
        )
    }

    /// Runs psql with `args` (ON_ERROR_STOP on, TLS verified against our CA).
    pub fn psql(&self, db: &str, args: &[&str]) -> Output {
        Command::new(tool("psql"))
            .arg(self.conninfo(db, "verify-full"))
            .args(["-X", "-v", "ON_ERROR_STOP=1", "-A", "-t", "-q"])
            .args(args)
            .env("PGPASSWORD", PASSWORD)
            .env("PGHOST", "localhost")
            .output()
            .unwrap()
    }

    /// psql -c SQL, asserting success; returns trimmed stdout.
    pub fn sql(&self, db: &str, sql: &str) -> String {
        let out = self.psql(db, &["-c", sql]);
        assert!(
            out.status.success(),
            "psql -c {sql:?} failed: {}\nserver log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// Polls `sql` until it answers `want`, failing after `limit`;
    /// returns how long that took.
    pub fn wait_sql(&self, sql: &str, want: &str, limit: Duration) -> Duration {
        let t0 = Instant::now();
        loop {
            let out = self.psql("postgres", &["-c", sql]);
            let got = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if got == want {
                return t0.elapsed();
            }
            assert!(
                t0.elapsed() < limit,
                "{sql}: want {want}, got {got} {} after {limit:?}\nserver log:\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn signal(&self, sig: i32) {
        let _ = signal_pid(self.pid(), sig);
    }

    /// SIGTERM and wait for a clean exit; returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        self.signal(15);
        self.wait(Duration::from_secs(60))
    }

    pub fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "server did not exit:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn state(&self) -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(self.dir.join("state.json")).unwrap())
            .unwrap()
    }

    /// GET a path of the metrics endpoint (plain HTTP/1.0).
    pub fn http_get(&self, path: &str) -> String {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.metrics_port)).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    /// A metric's value from /metrics.
    pub fn metric(&self, name: &str) -> f64 {
        let text = self.http_get("/metrics");
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Every file under `dir`, with its bytes.
pub fn files_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(b) = std::fs::read(&p) {
                out.push((p, b));
            }
        }
    }
    out
}

pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// A local HTTP receiver: records JSON bodies; answers 503 to the first
/// request (to exercise retries), 200 afterwards.
pub fn webhook_receiver() -> (
    u16,
    std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
) {
    use std::io::{BufRead, Read, Write};
    use std::sync::{Arc, Mutex};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = Arc::clone(&got);
    std::thread::spawn(move || {
        let mut first = true;
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let mut r = std::io::BufReader::new(s.try_clone().unwrap());
            let mut len = 0usize;
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0u8; len];
            let _ = r.read_exact(&mut body);
            if first {
                first = false;
                let _ = s.write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                continue;
            }
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) {
                g.lock().unwrap().push(v);
            }
            let _ =
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        }
    });
    (port, got)
}
