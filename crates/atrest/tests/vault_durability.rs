//! Audit integrity and fail-closed behaviour, crash safety under kill -9,
//! and the unseal model, all against the real binary.

mod vault_common;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vault_common::*;

#[test]
fn audit_verify_names_an_edited_or_removed_line() {
    let v = start();
    let (_, id, secret) = v.identity("app", &["all"]);
    let tok = token(&v, &id, &secret);
    for i in 0..5 {
        v.raw(
            Method::POST,
            &format!("/keys/k{i}/create"),
            Some(&tok),
            body(&json!({"kty": "RSA"})),
        );
    }
    let data = v.data_dir().to_str().unwrap().to_string();
    let ok = run_cli(&["vault", "audit", "verify", "--data", &data]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );
    let text = std::fs::read_to_string(v.audit_path()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() >= 8);
    // Edit line 6: change the caller address.
    let copy = v.data_dir().join("edited.log");
    let mut edited: Vec<String> = lines.iter().map(|s| s.to_string()).collect();
    edited[5] = edited[5].replace(
        "\"callerIpAddress\":\"127.0.0.1\"",
        "\"callerIpAddress\":\"10.9.9.9\"",
    );
    assert_ne!(edited[5], lines[5]);
    std::fs::write(&copy, edited.join("\n") + "\n").unwrap();
    let out = run_cli(&["vault", "audit", "verify", "--file", copy.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("line 6"), "{stdout}");
    // Remove line 3.
    let mut removed: Vec<&str> = lines.clone();
    removed.remove(2);
    std::fs::write(&copy, removed.join("\n") + "\n").unwrap();
    let out = run_cli(&["vault", "audit", "verify", "--file", copy.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("line 3"));
    // A smarter attacker edits line 6 and recomputes every hash after it:
    // the plain hash chain then checks out, the MACs do not.
    let mut prev = "0".repeat(64);
    let mut rewritten = String::new();
    for (i, l) in lines.iter().enumerate() {
        let full: Value = serde_json::from_str(l).unwrap();
        let mut v = full.clone();
        let o = v.as_object_mut().unwrap();
        o.remove("hash");
        o.remove("mac");
        o.insert("prevHash".into(), json!(prev));
        if i == 5 {
            o.insert("callerIpAddress".into(), json!("10.9.9.9"));
        }
        let body = serde_json::to_string(&v).unwrap();
        let h = atrest_vault::auth::secret_hash(&body);
        rewritten.push_str(&format!("{},\"hash\":\"{h}\"}}\n", &body[..body.len() - 1]));
        prev = h;
    }
    std::fs::write(&copy, &rewritten).unwrap();
    let out = run_cli(&["vault", "audit", "verify", "--file", copy.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "hash-only check cannot see a full rewrite"
    );
    let key = v.keydir.path().join("unseal.key");
    let stdout = verify_fails_with_key(&copy, &data, &key);
    assert!(
        stdout.contains("line 1") && stdout.contains("MAC"),
        "{stdout}"
    );
    let out = run_cli(&[
        "vault",
        "audit",
        "verify",
        "--data",
        &data,
        "--unseal-key-file",
        key.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("MACs verified"),
        "{stdout}"
    );
    // Cutting lines off the end keeps the chain consistent, but the vault
    // sealed the position of its last change into its database.
    let truncated = lines[..lines.len() - 2].join("\n") + "\n";
    std::fs::write(&copy, &truncated).unwrap();
    let out = run_cli(&["vault", "audit", "verify", "--file", copy.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "without the key a truncation is invisible"
    );
    let stdout = verify_fails_with_key(&copy, &data, &key);
    assert!(stdout.contains("cut off the end"), "{stdout}");
    // Swap lines 4 and 5.
    let mut swapped: Vec<&str> = lines.clone();
    swapped.swap(3, 4);
    std::fs::write(&copy, swapped.join("\n") + "\n").unwrap();
    let out = run_cli(&["vault", "audit", "verify", "--file", copy.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("line 4"));
}

#[test]
fn unwritable_audit_log_refuses_operations_and_health_says_why() {
    let v = start();
    let (_, id, secret) = v.identity("app", &["all"]);
    let tok = token(&v, &id, &secret);
    v.raw(
        Method::POST,
        "/keys/k/create",
        Some(&tok),
        body(&json!({"kty": "RSA"})),
    );
    let w = v.raw(
        Method::POST,
        "/keys/k//wrapkey",
        Some(&tok),
        body(&json!({"alg": "RSA-OAEP-256", "value": "AAAA"})),
    );
    assert_eq!(w.status, 200);
    // Root ignores file modes, so make the log path a directory instead.
    let log = v.audit_path();
    let saved = v.data_dir().join("audit.saved");
    std::fs::rename(&log, &saved).unwrap();
    std::fs::create_dir(&log).unwrap();
    let unwrap = json!({"alg": "RSA-OAEP-256", "value": w.body["value"]});
    let r = v.raw(
        Method::POST,
        "/keys/k//unwrapkey",
        Some(&tok),
        body(&unwrap),
    );
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.error_code(), Some("AuditLogUnavailable"));
    assert!(r.body.get("value").is_none());
    let r = v.raw(
        Method::POST,
        "/keys/new/create",
        Some(&tok),
        body(&json!({"kty": "RSA"})),
    );
    assert_eq!(r.status, 503, "{}", r.body);
    let http = atrest_vault::client::http_client(&v.ca, None).unwrap();
    let (s, h) = block_on(async {
        let r = http.get(format!("{}/healthz", v.url)).send().await.unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    });
    assert_eq!(s, 503);
    assert!(h["reason"].as_str().unwrap().contains("audit"), "{h}");
    // Repaired: service resumes, the refused create left nothing behind,
    // and the chain continues.
    std::fs::remove_dir(&log).unwrap();
    std::fs::rename(&saved, &log).unwrap();
    let r = v.raw(
        Method::POST,
        "/keys/k//unwrapkey",
        Some(&tok),
        body(&unwrap),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        v.raw(Method::GET, "/keys/new", Some(&tok), None).status,
        404
    );
    assert_audit_verifies(v.data_dir());
}

#[test]
fn kill9_during_burst_loses_no_acknowledged_operation() {
    let mut v = start();
    let (_, id, secret) = v.identity("burst", &["all"]);
    let url = v.url.clone();
    let ca = v.ca.clone();
    let tenant = v.tenant.clone();
    // Acknowledged operations: (key, version, deleted).
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, String, bool)>::new()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let attempted_deletes = std::sync::Arc::new(std::sync::Mutex::new(
        std::collections::HashSet::<String>::new(),
    ));
    let mut workers = vec![];
    for w in 0..4 {
        let (url, ca, tenant, id, secret) = (
            url.clone(),
            ca.clone(),
            tenant.clone(),
            id.clone(),
            secret.clone(),
        );
        let acked = acked.clone();
        let stop = stop.clone();
        let attempted = attempted_deletes.clone();
        workers.push(std::thread::spawn(move || {
            let c = atrest_vault::VaultClient::new(&url, &ca, &tenant, &id, &secret).unwrap();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) && i < 500 {
                let name = format!("w{w}-k{i}");
                let ver = |r: &Value| {
                    r["key"]["kid"]
                        .as_str()
                        .unwrap()
                        .rsplit('/')
                        .next()
                        .unwrap()
                        .to_string()
                };
                match block_on(c.call(
                    Method::POST,
                    &format!("/keys/{name}/create"),
                    Some(json!({"kty": "RSA"})),
                )) {
                    Ok(r) => acked.lock().unwrap().push((name.clone(), ver(&r), false)),
                    Err(_) => break,
                }
                match block_on(c.call(Method::POST, &format!("/keys/{name}/rotate"), None)) {
                    Ok(r) => acked.lock().unwrap().push((name.clone(), ver(&r), false)),
                    Err(_) => break,
                }
                if i % 3 == 0 {
                    // Sent but maybe not acknowledged: either outcome is fine.
                    attempted.lock().unwrap().insert(name.clone());
                    match block_on(c.call(Method::DELETE, &format!("/keys/{name}"), None)) {
                        Ok(r) => acked.lock().unwrap().push((name.clone(), ver(&r), true)),
                        Err(_) => break,
                    }
                }
                i += 1;
            }
        }));
    }
    let t0 = Instant::now();
    while acked.lock().unwrap().len() < 40 && t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(10));
    }
    v.kill9();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for w in workers {
        w.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 40, "burst too small: {}", acked.len());
    v.spawn();
    let (_, cid, csecret) = v.identity("check", &["get", "list"]);
    let tok = token(&v, &cid, &csecret);
    let deleted: std::collections::HashSet<&str> =
        acked.iter().filter(|a| a.2).map(|a| a.0.as_str()).collect();
    for (name, version, _) in &acked {
        if deleted.contains(name.as_str()) {
            let r = v.raw(
                Method::GET,
                &format!("/deletedkeys/{name}"),
                Some(&tok),
                None,
            );
            assert_eq!(
                r.status, 200,
                "acknowledged delete of {name} lost: {}",
                r.body
            );
        } else if attempted_deletes.lock().unwrap().contains(name) {
            let live = v.raw(
                Method::GET,
                &format!("/keys/{name}/{version}"),
                Some(&tok),
                None,
            );
            let gone = v.raw(
                Method::GET,
                &format!("/deletedkeys/{name}"),
                Some(&tok),
                None,
            );
            assert!(
                live.status == 200 || gone.status == 200,
                "acknowledged {name}/{version} lost (delete was in flight): {} / {}",
                live.body,
                gone.body
            );
        } else {
            let r = v.raw(
                Method::GET,
                &format!("/keys/{name}/{version}"),
                Some(&tok),
                None,
            );
            assert_eq!(
                r.status, 200,
                "acknowledged {name}/{version} lost: {}",
                r.body
            );
        }
    }
    assert_audit_verifies(v.data_dir());
}

fn wait_url(data: &std::path::Path, child: &mut std::process::Child) -> Result<String, String> {
    let t0 = Instant::now();
    loop {
        if let Ok(u) = std::fs::read_to_string(data.join("vault.url")) {
            if u.ends_with('\n') {
                return Ok(u.trim().to_string());
            }
        }
        if let Ok(Some(st)) = child.try_wait() {
            let mut err = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return Err(format!("exited {st}: {err}"));
        }
        assert!(t0.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn serve(data: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_atrest"))
        .args([
            "vault",
            "serve",
            "--data",
            data.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn unseal_model_wrong_key_colocated_key_and_passphrase() {
    let data = tempfile::tempdir().unwrap();
    let keys = tempfile::tempdir().unwrap();
    let k1 = keys.path().join("k1");
    let k2 = keys.path().join("k2");
    for k in [&k1, &k2] {
        let o = run_cli(&["vault", "init-key", "--out", k.to_str().unwrap()]);
        assert!(o.status.success());
    }
    let mut c = serve(
        data.path(),
        &["--unseal-key-file", k1.to_str().unwrap()],
        &[],
    );
    wait_url(data.path(), &mut c).unwrap();
    c.kill().unwrap();
    c.wait().unwrap();
    let _ = std::fs::remove_file(data.path().join("vault.url"));
    let mut c = serve(
        data.path(),
        &["--unseal-key-file", k2.to_str().unwrap()],
        &[],
    );
    let err = wait_url(data.path(), &mut c).unwrap_err();
    assert!(err.contains("does not match"), "{err}");
    // A key file inside the data directory is refused.
    std::fs::copy(&k1, data.path().join("k1")).unwrap();
    let mut c = serve(
        data.path(),
        &[
            "--unseal-key-file",
            data.path().join("k1").to_str().unwrap(),
        ],
        &[],
    );
    let err = wait_url(data.path(), &mut c).unwrap_err();
    assert!(
        err.contains("must not be inside the data directory"),
        "{err}"
    );

    // Passphrase mode.
    let pdata = tempfile::tempdir().unwrap();
    let mut c = serve(
        pdata.path(),
        &["--passphrase-env", "VPW"],
        &[("VPW", "correct horse")],
    );
    wait_url(pdata.path(), &mut c).unwrap();
    c.kill().unwrap();
    c.wait().unwrap();
    let _ = std::fs::remove_file(pdata.path().join("vault.url"));
    let mut c = serve(
        pdata.path(),
        &["--passphrase-env", "VPW"],
        &[("VPW", "wrong horse")],
    );
    let err = wait_url(pdata.path(), &mut c).unwrap_err();
    assert!(err.contains("does not match"), "{err}");
}

#[test]
fn private_keys_are_not_in_the_data_directory_in_clear() {
    let v = start();
    let (_, id, secret) = v.identity("app", &["import", "get"]);
    let tok = token(&v, &id, &secret);
    let jwk = atrest_vault::import::generate_test_jwk();
    let r = v.raw(
        Method::PUT,
        "/keys/byok",
        Some(&tok),
        body(&json!({"key": jwk})),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body["key"].get("d").is_none());
    // The generated TLS server key is sealed in the database, not a file.
    assert!(v.data_dir().join("tls/ca.pem").exists());
    let tls_files: Vec<_> = std::fs::read_dir(v.data_dir().join("tls"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    for f in &tls_files {
        let text = std::fs::read_to_string(v.data_dir().join("tls").join(f)).unwrap();
        assert!(!text.contains("PRIVATE KEY"), "{f:?} holds a private key");
    }
    let d = atrest_vault::b64::decode(jwk["d"].as_str().unwrap()).unwrap();
    let p = atrest_vault::b64::decode(jwk["p"].as_str().unwrap()).unwrap();
    for entry in std::fs::read_dir(v.data_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            let bytes = std::fs::read(&path).unwrap();
            for secret in [&d[..32], &p[..32]] {
                assert!(
                    !bytes.windows(32).any(|w| w == secret),
                    "private key bytes in clear in {}",
                    path.display()
                );
            }
        }
    }
}

#[test]
fn cli_admin_commands_and_key_import() {
    let v = start();
    let data = v.data_dir().to_str().unwrap().to_string();
    let out = run_cli(&[
        "vault",
        "identity",
        "create",
        "--data",
        &data,
        "importer",
        "--permissions",
        "import,get",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id: Value = serde_json::from_slice(&out.stdout).unwrap();
    let cid = id["clientId"].as_str().unwrap().to_string();
    let out = run_cli(&[
        "vault",
        "policy",
        "set",
        "--data",
        &data,
        &cid,
        "--permissions",
        "import,get,list",
    ]);
    assert!(out.status.success());
    let p: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(p["permissions"]["keys"], json!(["get", "import", "list"]));
    let out = run_cli(&[
        "vault",
        "policy",
        "set",
        "--data",
        &data,
        &cid,
        "--permissions",
        "fly",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a key permission"));
    let out = run_cli(&[
        "vault",
        "firewall",
        "set",
        "--data",
        &data,
        "--default",
        "deny",
        "--allow",
        "127.0.0.1/32,10.0.0.0/8",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fw: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(fw["defaultAction"], "Deny");
    // Import a PKCS#8 PEM written by openssl if present, else by us.
    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("k.pem");
    let have_openssl = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            pem.to_str().unwrap(),
        ])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        have_openssl || std::env::var_os("CI").is_none(),
        "openssl needed in CI"
    );
    if have_openssl {
        let pfx = dir.path().join("k.pfx");
        let cert = dir.path().join("c.pem");
        assert!(Command::new("openssl")
            .args([
                "req",
                "-new",
                "-x509",
                "-key",
                pem.to_str().unwrap(),
                "-subj",
                "/CN=t",
                "-days",
                "1",
                "-out",
                cert.to_str().unwrap()
            ])
            .status()
            .unwrap()
            .success());
        assert!(Command::new("openssl")
            .args([
                "pkcs12",
                "-export",
                "-inkey",
                pem.to_str().unwrap(),
                "-in",
                cert.to_str().unwrap(),
                "-passout",
                "pass:s3cret",
                "-out",
                pfx.to_str().unwrap()
            ])
            .status()
            .unwrap()
            .success());
        for (name, file, pw) in [("from-pem", &pem, None), ("from-pfx", &pfx, Some("s3cret"))] {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_atrest"));
            cmd.args([
                "vault",
                "key",
                "import",
                "--data",
                &data,
                name,
                "--file",
                file.to_str().unwrap(),
                "--client-id",
                &cid,
                "--client-secret-env",
                "CS",
            ])
            .env("CS", id["clientSecret"].as_str().unwrap());
            if let Some(pw) = pw {
                cmd.args(["--password-env", "PW"]).env("PW", pw);
            }
            let out = cmd.output().unwrap();
            assert!(
                out.status.success(),
                "{name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let b: Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(b["key"]["kty"], "RSA");
            assert!(b["key"].get("d").is_none());
        }
        // Wrong PKCS#12 password: refused before anything is sent.
        let out = Command::new(env!("CARGO_BIN_EXE_atrest"))
            .args([
                "vault",
                "key",
                "import",
                "--data",
                &data,
                "bad",
                "--file",
                pfx.to_str().unwrap(),
                "--client-id",
                &cid,
                "--client-secret-env",
                "CS",
                "--password-env",
                "PW",
            ])
            .env("CS", id["clientSecret"].as_str().unwrap())
            .env("PW", "nope")
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("wrong password"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = run_cli(&["vault", "identity", "delete", "--data", &data, &cid]);
    assert!(out.status.success());
    let out = run_cli(&["vault", "identity", "list", "--data", &data]);
    let l: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(l["value"], json!([]));
}

#[test]
fn audit_write_failing_after_the_precheck_rolls_the_change_back() {
    // /dev/full opens fine (so the pre-check passes) but every write fails
    // with ENOSPC: the failure happens at the real append.
    if !std::path::Path::new("/dev/full").exists() {
        assert!(std::env::var_os("CI").is_none(), "/dev/full is needed");
        return;
    }
    let v = start();
    let (_, id, secret) = v.identity("app", &["all"]);
    let tok = token(&v, &id, &secret);
    let r = v.raw(
        Method::POST,
        "/keys/k/create",
        Some(&tok),
        body(&json!({"kty": "RSA"})),
    );
    assert_eq!(r.status, 200);
    let log = v.audit_path();
    let saved = v.data_dir().join("audit.saved");
    std::fs::rename(&log, &saved).unwrap();
    std::os::unix::fs::symlink("/dev/full", &log).unwrap();
    let r = v.raw(
        Method::POST,
        "/keys/k2/create",
        Some(&tok),
        body(&json!({"kty": "RSA"})),
    );
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.error_code(), Some("AuditLogUnavailable"));
    let r = v.raw(Method::DELETE, "/keys/k", Some(&tok), None);
    assert_eq!(r.status, 503, "{}", r.body);
    let r = v.raw(
        Method::POST,
        "/keys/k//wrapkey",
        Some(&tok),
        body(&json!({"alg": "RSA-OAEP-256", "value": "AAAA"})),
    );
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body.get("value").is_none());
    std::fs::remove_file(&log).unwrap();
    std::fs::rename(&saved, &log).unwrap();
    // Neither the create nor the delete happened.
    assert_eq!(v.raw(Method::GET, "/keys/k2", Some(&tok), None).status, 404);
    assert_eq!(v.raw(Method::GET, "/keys/k", Some(&tok), None).status, 200);
    assert_audit_verifies(v.data_dir());
}

#[test]
fn operator_supplied_certificate_and_external_admin_credential() {
    let data = tempfile::tempdir().unwrap();
    let ext = tempfile::tempdir().unwrap();
    let g = atrest_vault::tls::generate(&["vault.test".into()]).unwrap();
    let chain = ext.path().join("chain.pem");
    let key = ext.path().join("key.pem");
    std::fs::write(&chain, &g.chain_pem).unwrap();
    std::fs::write(&key, g.key_pem.as_bytes()).unwrap();
    let unseal = ext.path().join("unseal.key");
    assert!(
        run_cli(&["vault", "init-key", "--out", unseal.to_str().unwrap()])
            .status
            .success()
    );
    let admin = ext.path().join("admin-token");
    let mut c = serve(
        data.path(),
        &[
            "--unseal-key-file",
            unseal.to_str().unwrap(),
            "--tls-cert",
            chain.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--admin-token-file",
            admin.to_str().unwrap(),
        ],
        &[],
    );
    let url = wait_url(data.path(), &mut c).unwrap();
    // Nothing administrative or TLS-private was written beside the data.
    assert!(!data.path().join("admin-token").exists());
    assert!(!data.path().join("tls").exists());
    let token = std::fs::read_to_string(&admin).unwrap();
    let a = atrest_vault::AdminClient::new(&url, g.ca_pem.as_bytes(), &token).unwrap();
    let props = block_on(a.call(Method::GET, "/vault", None)).unwrap();
    assert!(props["tenantId"].is_string());
    // A client trusting another CA refuses the connection.
    let other = atrest_vault::tls::generate(&[]).unwrap();
    let b = atrest_vault::AdminClient::new(&url, other.ca_pem.as_bytes(), &token).unwrap();
    let e = block_on(b.call(Method::GET, "/vault", None)).unwrap_err();
    assert!(e.is_outage(), "{e}");
    c.kill().unwrap();
    c.wait().unwrap();
}

#[test]
fn rekey_reseals_everything_under_a_new_master_key() {
    let mut v = start();
    let (_, id, secret) = v.identity("app", &["all"]);
    let tok = token(&v, &id, &secret);
    let r = v.raw(
        Method::POST,
        "/keys/k/create",
        Some(&tok),
        body(&json!({"kty": "RSA"})),
    );
    assert_eq!(r.status, 200);
    let w = v.raw(
        Method::POST,
        "/keys/k//wrapkey",
        Some(&tok),
        body(&json!({"alg": "RSA-OAEP-256", "value": "c2VjcmV0"})),
    );
    let version = w.body["kid"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_string();
    let data = v.data_dir().to_str().unwrap().to_string();
    let old = v.keydir.path().join("unseal.key");
    let newdir = tempfile::tempdir().unwrap();
    let new = newdir.path().join("new.key");
    assert!(
        run_cli(&["vault", "init-key", "--out", new.to_str().unwrap()])
            .status
            .success()
    );
    let rekey = |old: &std::path::Path| {
        run_cli(&[
            "vault",
            "rekey",
            "--data",
            &data,
            "--unseal-key-file",
            old.to_str().unwrap(),
            "--new-unseal-key-file",
            new.to_str().unwrap(),
        ])
    };
    // Refused while the vault runs.
    let out = rekey(&old);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("running"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(v.terminate());
    let out = rekey(&old);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The old key no longer opens the vault.
    let mut c = serve(
        v.data_dir(),
        &["--unseal-key-file", old.to_str().unwrap()],
        &[],
    );
    let err = wait_url(v.data_dir(), &mut c).unwrap_err();
    assert!(err.contains("does not match"), "{err}");
    // The new one does, and everything still works.
    std::fs::copy(&new, &old).unwrap();
    v.spawn();
    let (_, id2, secret2) = v.identity("after", &["unwrapKey"]);
    let tok2 = token(&v, &id2, &secret2);
    let u = v.raw(
        Method::POST,
        &format!("/keys/k/{version}/unwrapkey"),
        Some(&tok2),
        body(&json!({"alg": "RSA-OAEP-256", "value": w.body["value"]})),
    );
    assert_eq!(u.body["value"], "c2VjcmV0", "{}", u.body);
    let out = run_cli(&[
        "vault",
        "audit",
        "verify",
        "--data",
        &data,
        "--unseal-key-file",
        new.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("MACs verified"),
        "{stdout}"
    );
}

/// `audit verify` of `file` with the vault's key must fail (exit 1); returns
/// what it printed.
fn verify_fails_with_key(file: &std::path::Path, data: &str, key: &std::path::Path) -> String {
    let out = run_cli(&[
        "vault",
        "audit",
        "verify",
        "--file",
        file.to_str().unwrap(),
        "--data",
        data,
        "--unseal-key-file",
        key.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    stdout
}
