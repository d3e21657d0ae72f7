//! Support for driving a real `atrest vault serve` process: the
//! integration tests (`crates/atrest/tests/vault_*.rs`) and the benchmark
//! use it. Not used by the server itself.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};

use crate::cli::{CliError, Conn};
use crate::client::{http_client, send, AdminClient, ClientError, RawResponse, VaultClient};

pub use reqwest;

/// A shared runtime so synchronous tests can call the async clients.
pub fn rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime")
    })
}

pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    rt().block_on(f)
}

/// A vault process with its own data directory and unseal key.
pub struct TestVault {
    pub bin: PathBuf,
    pub data: tempfile::TempDir,
    pub keydir: tempfile::TempDir,
    pub child: Option<Child>,
    pub url: String,
    pub ca: Vec<u8>,
    pub admin_token: String,
    pub tenant: String,
    pub extra_args: Vec<String>,
}

impl TestVault {
    /// Starts `bin vault serve` on an ephemeral loopback port with the test
    /// clock enabled.
    pub fn start(bin: &Path, extra_args: &[&str]) -> TestVault {
        let data = tempfile::tempdir().expect("tempdir");
        let keydir = tempfile::tempdir().expect("tempdir");
        crate::seal::MasterKey::create_key_file(&keydir.path().join("unseal.key"))
            .expect("key file");
        let mut v = TestVault {
            bin: bin.to_path_buf(),
            data,
            keydir,
            child: None,
            url: String::new(),
            ca: vec![],
            admin_token: String::new(),
            tenant: String::new(),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
        };
        v.spawn();
        v
    }

    /// Starts a second vault unsealed with the same master key as `other`
    /// (a replica for backup/restore purposes), with its own data.
    pub fn start_sharing_key(bin: &Path, other: &TestVault, extra_args: &[&str]) -> TestVault {
        let data = tempfile::tempdir().expect("tempdir");
        let keydir = tempfile::tempdir().expect("tempdir");
        std::fs::copy(
            other.keydir.path().join("unseal.key"),
            keydir.path().join("unseal.key"),
        )
        .expect("copy key");
        let mut v = TestVault {
            bin: bin.to_path_buf(),
            data,
            keydir,
            child: None,
            url: String::new(),
            ca: vec![],
            admin_token: String::new(),
            tenant: String::new(),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
        };
        v.spawn();
        v
    }

    pub fn data_dir(&self) -> &Path {
        self.data.path()
    }

    /// The `vault serve` command `spawn` runs, for tests that need to drive
    /// the process themselves.
    pub fn serve_command(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("vault")
            .arg("serve")
            .arg("--data")
            .arg(self.data.path())
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--unseal-key-file")
            .arg(self.keydir.path().join("unseal.key"))
            .arg("--test-clock")
            .args(&self.extra_args)
            .env("ATREST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        cmd
    }

    pub fn spawn(&mut self) {
        // A killed vault leaves its old URL behind.
        let _ = std::fs::remove_file(self.data.path().join("vault.url"));
        let child = self
            .serve_command()
            .spawn()
            .expect("spawn atrest vault serve");
        self.child = Some(child);
        let url_file = self.data.path().join("vault.url");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(u) = std::fs::read_to_string(&url_file) {
                if u.ends_with('\n') {
                    self.url = u.trim().to_string();
                    break;
                }
            }
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("vault exited during start: {st}");
            }
            assert!(Instant::now() < deadline, "vault did not start within 60 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        self.ca = std::fs::read(self.data.path().join("tls/ca.pem")).expect("ca.pem");
        self.admin_token = std::fs::read_to_string(self.data.path().join("admin-token"))
            .expect("admin-token")
            .trim()
            .to_string();
        let props = block_on(self.admin().call(Method::GET, "/vault", None)).expect("vault props");
        self.tenant = props["tenantId"].as_str().unwrap_or_default().to_string();
    }

    /// SIGKILL, no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit; returns whether it exited 0.
    pub fn terminate(&mut self) -> bool {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(st)) = c.try_wait() {
                    return st.success();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        false
    }

    pub fn admin(&self) -> AdminClient {
        AdminClient::new(&self.url, &self.ca, &self.admin_token).expect("admin client")
    }

    pub fn admin_call(
        &self,
        m: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, ClientError> {
        block_on(self.admin().call(m, path, body))
    }

    /// Creates an identity with `perms` and returns a client for it.
    pub fn identity(&self, name: &str, perms: &[&str]) -> (VaultClient, String, String) {
        let (id, secret) =
            block_on(self.admin().create_identity(name, perms)).expect("create identity");
        let c = VaultClient::new(&self.url, &self.ca, &self.tenant, &id, &secret).expect("client");
        (c, id, secret)
    }

    /// One raw data-plane request with an explicit token (or none).
    pub fn raw(
        &self,
        m: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> RawResponse {
        self.raw_from(None, m, path, token, body)
    }

    /// Same, from a chosen local address (firewall tests use 127.0.0.x).
    pub fn raw_from(
        &self,
        local: Option<std::net::IpAddr>,
        m: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> RawResponse {
        let http = http_client(&self.ca, local).expect("http");
        let sep = if path.contains('?') { '&' } else { '?' };
        let url = format!("{}{path}{sep}api-version=7.4", self.url);
        block_on(send(&http, m, &url, token, body)).expect("request")
    }

    pub fn advance_clock(&self, secs: i64) -> Value {
        self.admin_call(
            Method::POST,
            "/clock",
            Some(json!({"advanceSeconds": secs})),
        )
        .expect("advance clock")
    }

    pub fn audit_path(&self) -> PathBuf {
        self.data.path().join("audit.log")
    }
}

impl Drop for TestVault {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs the unwrapKey benchmark against a running vault.
pub async fn bench_unwrap(
    conn: &Conn,
    concurrency: usize,
    seconds: u64,
    key_size: u32,
) -> Result<Value, CliError> {
    let (url, ca, admin_token) = conn.resolve()?;
    let admin = AdminClient::new(&url, &ca, &admin_token)?;
    let tenant = admin.call(Method::GET, "/vault", None).await?["tenantId"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let suffix = hex::encode(crate::seal::random_bytes::<4>());
    let (id, secret) = admin
        .create_identity(
            &format!("bench-{suffix}"),
            &["create", "wrapKey", "unwrapKey", "delete", "purge"],
        )
        .await?;
    let setup = VaultClient::new(&url, &ca, &tenant, &id, &secret)?;
    let key = format!("bench-{suffix}");
    setup
        .call(
            Method::POST,
            &format!("/keys/{key}/create"),
            Some(json!({"kty": "RSA", "key_size": key_size})),
        )
        .await?;
    let dek = crate::seal::random_bytes::<32>();
    let (kid, wrapped) = setup.wrap_key(&key, None, "RSA-OAEP-256", &dek).await?;
    let version = kid.rsplit('/').next().unwrap_or_default().to_string();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let c = VaultClient::new(&url, &ca, &tenant, &id, &secret)?;
        let (key, version, wrapped) = (key.clone(), version.clone(), wrapped.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let mut wrong = 0u64;
            while Instant::now() < deadline {
                let t = Instant::now();
                match c.unwrap_key(&key, &version, "RSA-OAEP-256", &wrapped).await {
                    Ok(p) => {
                        if p[..] != dek[..] {
                            wrong += 1;
                        }
                        lat.push(t.elapsed().as_secs_f64() * 1000.0)
                    }
                    Err(_) => errors += 1,
                }
            }
            (lat, errors, wrong)
        }));
    }
    let mut lat = Vec::new();
    let mut errors = 0;
    let mut wrong = 0;
    for t in tasks {
        let (l, e, w) = t
            .await
            .map_err(|e| CliError::Usage(format!("bench task failed: {e}")))?;
        lat.extend(l);
        errors += e;
        wrong += w;
    }
    let elapsed = started.elapsed().as_secs_f64();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return 0.0;
        }
        lat[((lat.len() as f64 - 1.0) * p).round() as usize]
    };
    // Leave nothing behind.
    let _ = setup
        .call(Method::DELETE, &format!("/keys/{key}"), None)
        .await;
    let _ = setup
        .call(Method::DELETE, &format!("/deletedkeys/{key}"), None)
        .await;
    let _ = admin
        .call(Method::DELETE, &format!("/identities/{id}"), None)
        .await;
    Ok(json!({
        "benchmark": "vault_unwrapkey",
        "alg": "RSA-OAEP-256",
        "key_size": key_size,
        "concurrency": concurrency,
        "seconds": elapsed,
        "ops": lat.len(),
        "ops_per_sec": lat.len() as f64 / elapsed,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "errors": errors,
        "wrong_plaintext": wrong,
    }))
}
