//! Customer-managed keys for the database server, against a real
//! `atrest vault serve`: identities with a certificate credential (client
//! assertions, `private_key_jwt`) and key dependents (no purge or disable
//! of a key version a server depends on without force).

mod vault_common;
use vault_common::*;

use atrest_vault::certauth::{generate_identity_certificate, AssertionSigner, ASSERTION_TYPE};
use atrest_vault::client::{http_client, RawResponse};
use atrest_vault::VaultClient;

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A server-side identity: key pair, certificate, client id, registered.
struct CertId {
    client_id: String,
    key_pem: String,
    signer: AssertionSigner,
    thumbprint: String,
}

fn cert_identity(v: &TestVault, name: &str, perms: &[&str]) -> CertId {
    let client_id = atrest_vault::store::new_guid();
    let (key_pem, cert_pem) = generate_identity_certificate(&client_id, name).unwrap();
    let (got, thumbprint) = block_on(v.admin().create_identity_with_certificate(
        name,
        Some(&client_id),
        &cert_pem,
        true,
        perms,
    ))
    .unwrap();
    assert_eq!(got, client_id);
    CertId {
        client_id,
        signer: AssertionSigner::from_pkcs8_pem(key_pem.as_bytes()).unwrap(),
        key_pem: key_pem.to_string(),
        thumbprint,
    }
}

fn aud(v: &TestVault) -> String {
    atrest_vault::token_endpoint(&v.url, &v.tenant)
}

/// POSTs a form to the token endpoint.
fn token_form(v: &TestVault, pairs: &[(&str, &str)]) -> RawResponse {
    let http = http_client(&v.ca, None).unwrap();
    let mut f = url_form(pairs);
    if !pairs.iter().any(|(k, _)| *k == "grant_type") {
        f = format!("grant_type=client_credentials&{f}");
    }
    if !pairs.iter().any(|(k, _)| *k == "scope") {
        f = format!("{f}&scope=https%3A%2F%2Fvault.azure.net%2F.default");
    }
    block_on(async {
        let r = http
            .post(aud(v))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(f)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        RawResponse {
            status,
            headers,
            body,
        }
    })
}

fn url_form(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn assertion_form(v: &TestVault, a: &str) -> RawResponse {
    token_form(
        v,
        &[
            ("client_assertion_type", ASSERTION_TYPE),
            ("client_assertion", a),
        ],
    )
}

fn claims(v: &TestVault, cid: &str, t: i64) -> Value {
    json!({"iss": cid, "sub": cid, "aud": aud(v), "iat": t, "nbf": t, "exp": t + 300,
           "jti": atrest_vault::store::new_guid()})
}

fn es256() -> Value {
    json!({"alg": "ES256", "typ": "JWT"})
}

/// Asserts an AAD-style refusal whose description mentions `needle`.
fn assert_refused(r: &RawResponse, status: u16, needle: &str) {
    assert_eq!(r.status, status, "{}", r.body);
    assert!(r.body["access_token"].is_null(), "{}", r.body);
    let d = r.body["error_description"].as_str().unwrap_or_default();
    assert!(
        d.to_lowercase().contains(&needle.to_lowercase()),
        "expected '{needle}' in: {}",
        r.body
    );
}

#[test]
fn certificate_identity_end_to_end_and_refusals() {
    let v = start();
    let (setup, _, _) = v.identity("setup", &["create", "get"]);
    block_on(setup.call(
        Method::POST,
        "/keys/cmk/create",
        Some(json!({"kty": "RSA", "key_size": 2048})),
    ))
    .unwrap();
    let db = cert_identity(&v, "db-server-1", &["get", "wrapKey", "unwrapKey"]);
    assert_eq!(db.thumbprint.len(), 64);

    // The identity JSON: certificate, no secret, anywhere.
    let list = v.admin_call(Method::GET, "/identities", None).unwrap();
    let me = list["value"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["clientId"] == db.client_id.as_str())
        .unwrap()
        .clone();
    assert_eq!(me["certificateThumbprint"], db.thumbprint.as_str());
    assert_eq!(me["credentialType"], "certificate");
    assert_eq!(me["kind"], "managedIdentity");
    assert!(me.get("clientSecret").is_none());

    // Discovery advertises private_key_jwt and the audience we sign for.
    let disc = v.raw(
        Method::GET,
        &format!("/{}/v2.0/.well-known/openid-configuration", v.tenant),
        None,
        None,
    );
    assert_eq!(disc.body["token_endpoint"], aud(&v).as_str());
    assert!(disc.body["token_endpoint_auth_methods_supported"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m == "private_key_jwt"));

    // End to end with VaultClient::with_certificate: get, wrap, unwrap.
    let c = VaultClient::with_certificate(
        http_client(&v.ca, None).unwrap(),
        &v.url,
        &v.tenant,
        &db.client_id,
        db.key_pem.as_bytes(),
    )
    .unwrap();
    let k = block_on(c.get_key("cmk", None)).unwrap();
    assert_eq!(k["key"]["kty"], "RSA");
    let dek = [7u8; 32];
    let (kid, wrapped) = block_on(c.wrap_key("cmk", None, "RSA-OAEP-256", &dek)).unwrap();
    let version = kid.rsplit('/').next().unwrap();
    let back = block_on(c.unwrap_key("cmk", version, "RSA-OAEP-256", &wrapped)).unwrap();
    assert_eq!(&back[..], &dek);
    // A fresh token (new assertion, new jti) works too.
    block_on(c.reset_token());
    assert!(block_on(c.get_key("cmk", None)).is_ok());

    // A good hand-made assertion, with the optional client_id and x5t#S256.
    let mut h = es256();
    h["x5t#S256"] = json!(atrest_vault::b64::encode(
        &hex::decode(&db.thumbprint).unwrap()
    ));
    let good = db.signer.sign_raw(&h, &claims(&v, &db.client_id, now()));
    let r = token_form(
        &v,
        &[
            ("client_id", &db.client_id),
            ("client_assertion_type", ASSERTION_TYPE),
            ("client_assertion", &good),
        ],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body["access_token"].as_str().is_some());
    // Replayed.
    assert_refused(&assertion_form(&v, &good), 401, "replayed");

    // Wrong key (another identity's key pair, same claims).
    let stranger = AssertionSigner::from_pkcs8_pem(
        generate_identity_certificate(&db.client_id, "x")
            .unwrap()
            .0
            .as_bytes(),
    )
    .unwrap();
    let a = stranger.sign_raw(&es256(), &claims(&v, &db.client_id, now()));
    assert_refused(&assertion_form(&v, &a), 401, "signature is invalid");
    // Tampered signature.
    let a = db
        .signer
        .sign_raw(&es256(), &claims(&v, &db.client_id, now()));
    let (rest, sig) = a.rsplit_once('.').unwrap();
    let mut sig = atrest_vault::b64::decode(sig).unwrap();
    sig[5] ^= 0x40;
    let tampered = format!("{rest}.{}", atrest_vault::b64::encode(&sig));
    assert_refused(&assertion_form(&v, &tampered), 401, "signature is invalid");
    // Tampered claims (longer exp) under the original signature.
    let parts: Vec<&str> = a.split('.').collect();
    let mut cl: Value =
        serde_json::from_slice(&atrest_vault::b64::decode(parts[1]).unwrap()).unwrap();
    cl["exp"] = json!(now() + 500);
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        atrest_vault::b64::encode(cl.to_string().as_bytes()),
        parts[2]
    );
    assert_refused(&assertion_form(&v, &forged), 401, "signature is invalid");
    // Expired.
    let mut cl = claims(&v, &db.client_id, now() - 400);
    cl["exp"] = json!(now() - 100);
    assert_refused(
        &assertion_form(&v, &db.signer.sign_raw(&es256(), &cl)),
        401,
        "expired",
    );
    // nbf in the future (beyond 60 s of skew).
    let cl = claims(&v, &db.client_id, now() + 200);
    assert_refused(
        &assertion_form(&v, &db.signer.sign_raw(&es256(), &cl)),
        401,
        "not yet valid",
    );
    // Lifetime over 10 minutes.
    let mut cl = claims(&v, &db.client_id, now());
    cl["exp"] = json!(now() + 3600);
    assert_refused(
        &assertion_form(&v, &db.signer.sign_raw(&es256(), &cl)),
        401,
        "lifetime",
    );
    // Wrong audience: another tenant, the real AAD, the v1 endpoint.
    for bad in [
        format!(
            "{}/00000000-0000-0000-0000-000000000000/oauth2/v2.0/token",
            v.url
        ),
        format!(
            "https://login.microsoftonline.com/{}/oauth2/v2.0/token",
            v.tenant
        ),
        format!("{}/{}/oauth2/token", v.url, v.tenant),
        v.url.clone(),
    ] {
        let mut cl = claims(&v, &db.client_id, now());
        cl["aud"] = json!(bad);
        assert_refused(
            &assertion_form(&v, &db.signer.sign_raw(&es256(), &cl)),
            401,
            "audience",
        );
    }
    // alg none and HS256.
    let cl = claims(&v, &db.client_id, now());
    let none = format!(
        "{}.{}.",
        atrest_vault::b64::encode(br#"{"alg":"none","typ":"JWT"}"#),
        atrest_vault::b64::encode(cl.to_string().as_bytes())
    );
    assert_refused(&assertion_form(&v, &none), 401, "'none' is not accepted");
    let hs = db.signer.sign_raw(&json!({"alg": "HS256"}), &cl);
    assert_refused(&assertion_form(&v, &hs), 401, "'HS256' is not accepted");
    // No jti.
    let mut cl = claims(&v, &db.client_id, now());
    cl.as_object_mut().unwrap().remove("jti");
    assert_refused(
        &assertion_form(&v, &db.signer.sign_raw(&es256(), &cl)),
        401,
        "jti",
    );
    // client_id that is not the assertion's issuer.
    let (_, other_id, other_secret) = v.identity("secret-user", &["get"]);
    let a = db
        .signer
        .sign_raw(&es256(), &claims(&v, &db.client_id, now()));
    let r = token_form(
        &v,
        &[
            ("client_id", &other_id),
            ("client_assertion_type", ASSERTION_TYPE),
            ("client_assertion", &a),
        ],
    );
    assert_refused(&r, 401, "does not match the client_id");
    // Wrong client_assertion_type.
    let r = token_form(
        &v,
        &[
            ("client_assertion_type", "urn:other"),
            ("client_assertion", &a),
        ],
    );
    assert_refused(&r, 400, "client_assertion_type must be");
    // Secret presented for a certificate identity (any secret).
    let r = token_form(
        &v,
        &[("client_id", &db.client_id), ("client_secret", "guess")],
    );
    assert_refused(&r, 401, "has a certificate credential");
    // Both a secret and an assertion.
    let r = token_form(
        &v,
        &[
            ("client_id", &db.client_id),
            ("client_secret", "x"),
            ("client_assertion_type", ASSERTION_TYPE),
            ("client_assertion", &a),
        ],
    );
    assert_refused(&r, 400, "not both");
    // An assertion for a secret identity (signed by some key).
    let a = db.signer.sign_raw(&es256(), &claims(&v, &other_id, now()));
    assert_refused(
        &assertion_form(&v, &a),
        401,
        "has no certificate credential",
    );
    // The secret identity keeps working with its secret.
    let r = token_form(
        &v,
        &[("client_id", &other_id), ("client_secret", &other_secret)],
    );
    assert_eq!(r.status, 200, "{}", r.body);

    // The audit log says which credential was used.
    let audit = std::fs::read_to_string(v.audit_path()).unwrap();
    let tokens: Vec<Value> = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|l| l.get("record").cloned().unwrap_or(l))
        .filter(|r| r["operationName"] == "TokenIssue")
        .collect();
    assert!(tokens
        .iter()
        .any(|r| r["properties"]["credentialType"] == "clientAssertion"
            && r["resultType"] == "Success"));
    assert!(tokens
        .iter()
        .any(|r| r["properties"]["credentialType"] == "clientAssertion"
            && r["resultType"] == "Failure"));
    assert!(tokens
        .iter()
        .any(|r| r["properties"]["credentialType"] == "clientSecret"));
    // No assertion or key material in the log.
    assert!(!audit.contains(&good));
    assert!(!audit.contains("PRIVATE KEY"));

    // Deleted identity: its assertions are refused, its tokens revoked.
    let tok = block_on(c.token()).unwrap();
    v.admin_call(
        Method::DELETE,
        &format!("/identities/{}", db.client_id),
        None,
    )
    .unwrap();
    let a = db
        .signer
        .sign_raw(&es256(), &claims(&v, &db.client_id, now()));
    assert_refused(&assertion_form(&v, &a), 400, "Application not found");
    let r = v.raw(Method::GET, "/keys/cmk", Some(&tok), None);
    assert_eq!(r.status, 401, "{}", r.body);
    let e = block_on(c.get_key("cmk", None)).unwrap_err();
    assert!(e.is_refusal(), "{e}");
    assert_audit_verifies(v.data_dir());
}

#[test]
fn certificate_registration_rules_and_persistence() {
    let mut v = start();
    let cid = atrest_vault::store::new_guid().to_uppercase();
    let (key_pem, cert_pem) = generate_identity_certificate(&cid, "db").unwrap();
    // Through the CLI, with a file and an upper-case client id.
    let dir = tempfile::tempdir().unwrap();
    let cert_file = dir.path().join("db.pem");
    std::fs::write(&cert_file, &cert_pem).unwrap();
    let data = v.data_dir().to_str().unwrap().to_string();
    let out = run_cli(&[
        "vault",
        "identity",
        "create",
        "--data",
        &data,
        "db-server",
        "--managed",
        "--certificate",
        cert_file.to_str().unwrap(),
        "--client-id",
        &cid,
        "--permissions",
        "get,wrapKey,unwrapKey",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let created: Value = serde_json::from_str(&stdout).unwrap();
    let lower = cid.to_lowercase();
    assert_eq!(created["clientId"], lower.as_str());
    assert!(created.get("clientSecret").is_none(), "{stdout}");
    assert!(!stdout.to_lowercase().contains("secret\""), "{stdout}");
    assert_eq!(created["certificateThumbprint"].as_str().unwrap().len(), 64);

    // The same client id again: 409, with or without a certificate.
    for body in [
        json!({"name": "dup", "clientId": lower, "certificate": cert_pem}),
        json!({"name": "dup", "clientId": cid}),
    ] {
        let e = v
            .admin_call(Method::POST, "/identities", Some(body))
            .unwrap_err();
        assert_eq!(e.status(), Some(409), "{e}");
    }
    // Not a GUID; not a certificate; an RSA certificate; P-384.
    let bad_id = v
        .admin_call(
            Method::POST,
            "/identities",
            Some(json!({"name": "x", "clientId": "db-1"})),
        )
        .unwrap_err();
    assert_eq!(bad_id.status(), Some(400));
    let e = v
        .admin_call(
            Method::POST,
            "/identities",
            Some(json!({"name": "x", "certificate": "-----BEGIN NOTHING-----"})),
        )
        .unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    for args in [
        &["-newkey", "rsa:2048"][..],
        &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384"][..],
    ] {
        let kf = dir.path().join("o.key");
        let cf = dir.path().join("o.pem");
        let st = std::process::Command::new("openssl")
            .args(["req", "-x509", "-nodes", "-days", "30", "-subj", "/CN=o"])
            .args(args)
            .arg("-keyout")
            .arg(&kf)
            .arg("-out")
            .arg(&cf)
            .output()
            .expect("openssl");
        assert!(
            st.status.success(),
            "{}",
            String::from_utf8_lossy(&st.stderr)
        );
        let e = v
            .admin_call(
                Method::POST,
                "/identities",
                Some(json!({"name": "o", "certificate": std::fs::read_to_string(&cf).unwrap()})),
            )
            .unwrap_err();
        assert_eq!(e.status(), Some(400), "{e}");
        assert!(e.to_string().contains("only EC P-256"), "{e}");
    }

    // Persisted: after a restart the identity still authenticates.
    v.terminate();
    v.spawn();
    let c = VaultClient::with_certificate(
        http_client(&v.ca, None).unwrap(),
        &v.url,
        &v.tenant,
        &lower,
        key_pem.as_bytes(),
    )
    .unwrap();
    let e = block_on(c.get_key("absent", None)).unwrap_err();
    // Authenticated (404 for the key), not 401.
    assert_eq!(e.status(), Some(404), "{e}");
    // A wrong private key in the client: the token request is refused.
    let (other_key, _) = generate_identity_certificate(&lower, "x").unwrap();
    let c = VaultClient::with_certificate(
        http_client(&v.ca, None).unwrap(),
        &v.url,
        &v.tenant,
        &lower,
        other_key.as_bytes(),
    )
    .unwrap();
    let e = block_on(c.token()).unwrap_err();
    assert_eq!(e.status(), Some(401), "{e}");
    assert!(e.to_string().contains("signature is invalid"), "{e}");
    // Not a key at all.
    assert!(VaultClient::with_certificate(
        http_client(&v.ca, None).unwrap(),
        &v.url,
        &v.tenant,
        &lower,
        b"-----BEGIN CERTIFICATE-----",
    )
    .is_err());
}

fn key_version(v: &TestVault, c: &VaultClient, name: &str) -> String {
    let _ = v;
    let k = block_on(c.get_key(name, None)).unwrap();
    k["key"]["kid"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_string()
}

fn audit_records(v: &TestVault) -> Vec<Value> {
    std::fs::read_to_string(v.audit_path())
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect()
}

#[test]
fn dependents_hold_back_purge_and_disable() {
    let v = start();
    let (officer, _, _) = v.identity(
        "officer",
        &[
            "create", "get", "update", "delete", "purge", "recover", "list",
        ],
    );
    for k in ["cmk", "other"] {
        block_on(officer.call(
            Method::POST,
            &format!("/keys/{k}/create"),
            Some(json!({"kty": "RSA", "key_size": 2048})),
        ))
        .unwrap();
    }
    let ver = key_version(&v, &officer, "cmk");
    let db1 = cert_identity(&v, "db1", &["get", "wrapKey", "unwrapKey"]);
    let c1 = VaultClient::with_certificate(
        http_client(&v.ca, None).unwrap(),
        &v.url,
        &v.tenant,
        &db1.client_id,
        db1.key_pem.as_bytes(),
    )
    .unwrap();
    let (c2, _, _) = v.identity("db2", &["get"]);
    let (nope, _, _) = v.identity("no-get", &["wrapKey", "unwrapKey", "list"]);
    let s1 = atrest_vault::store::new_guid();
    let s2 = atrest_vault::store::new_guid();

    // Without get: refused, nothing registered.
    let e = block_on(nope.register_dependent("cmk", &ver, &s1, "db1", "x")).unwrap_err();
    assert_eq!(e.status(), Some(403), "{e}");
    assert_eq!(e.inner_code(), Some("AccessDenied"));
    // Bad ids, versions, bodies.
    let e = block_on(c1.register_dependent("cmk", &ver, "not-a-guid", "db1", "")).unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    let e = block_on(c1.register_dependent("cmk", "0123", &s1, "db1", "")).unwrap_err();
    assert_eq!(e.status(), Some(404), "{e}");
    let e = block_on(c1.register_dependent("absent", &ver, &s1, "db1", "")).unwrap_err();
    assert_eq!(e.status(), Some(404), "{e}");
    let e = block_on(c1.register_dependent("cmk", &ver, &s1, "", "")).unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");

    // Register (idempotent) and list.
    let d = block_on(c1.register_dependent("cmk", &ver, &s1, "db1", "orders database")).unwrap();
    assert_eq!(d["id"], s1.as_str());
    assert_eq!(d["clientId"], db1.client_id.as_str());
    let again =
        block_on(c1.register_dependent("cmk", &ver, &s1, "db1", "orders database")).unwrap();
    assert_eq!(again, d);
    block_on(c2.register_dependent("cmk", &ver, &s2, "db2", "")).unwrap();
    let list = block_on(c1.list_dependents("cmk", &ver)).unwrap();
    let items = list["value"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{list}");
    let mine = items.iter().find(|i| i["id"] == s1.as_str()).unwrap();
    for f in ["id", "name", "description", "clientId", "registered"] {
        assert!(!mine[f].is_null(), "{f} missing: {mine}");
    }
    assert_eq!(mine["description"], "orders database");
    // Another identity cannot take over or remove someone else's registration.
    let e = block_on(c2.register_dependent("cmk", &ver, &s1, "evil", "")).unwrap_err();
    assert_eq!(e.status(), Some(409), "{e}");
    let e = block_on(c2.unregister_dependent("cmk", &ver, &s1)).unwrap_err();
    assert_eq!(e.status(), Some(403), "{e}");
    assert_eq!(e.inner_code(), Some("DependentOwnedByAnother"));
    assert_eq!(
        block_on(c1.list_dependents("cmk", &ver)).unwrap()["value"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // Disabling the version is refused, naming both servers.
    let disable = |force: bool| {
        block_on(officer.call(
            Method::PATCH,
            &format!("/keys/cmk/{ver}{}", if force { "?force=true" } else { "" }),
            Some(json!({"attributes": {"enabled": false}})),
        ))
    };
    let e = disable(false).unwrap_err();
    assert_eq!(e.status(), Some(409), "{e}");
    assert_eq!(e.code(), Some("Conflict"));
    assert_eq!(e.inner_code(), Some("KeyInUse"));
    let msg = e.to_string();
    for needle in [
        s1.as_str(),
        s2.as_str(),
        "db1",
        "db2",
        "force=true",
        "Rewrap",
    ] {
        assert!(msg.contains(needle), "'{needle}' not in {msg}");
    }
    // Through PATCH /keys/cmk (current version) too.
    let e = block_on(officer.call(
        Method::PATCH,
        "/keys/cmk",
        Some(json!({"attributes": {"enabled": false}})),
    ))
    .unwrap_err();
    assert_eq!(e.inner_code(), Some("KeyInUse"), "{e}");
    // Other updates are fine; the key still works for the server.
    block_on(officer.call(
        Method::PATCH,
        &format!("/keys/cmk/{ver}"),
        Some(json!({"tags": {"owner": "dba"}})),
    ))
    .unwrap();
    assert!(block_on(c1.wrap_key("cmk", Some(&ver), "RSA-OAEP-256", &[1; 32])).is_ok());

    // Soft delete stays allowed; purge is refused with both named.
    block_on(officer.call(Method::DELETE, "/keys/cmk", None)).unwrap();
    let e = block_on(officer.call(Method::DELETE, "/deletedkeys/cmk", None)).unwrap_err();
    assert_eq!(e.status(), Some(409), "{e}");
    assert_eq!(e.inner_code(), Some("KeyInUse"));
    for needle in [s1.as_str(), s2.as_str(), "db1", "db2"] {
        assert!(e.to_string().contains(needle), "{e}");
    }
    // Moving the clock less than the retention period purges nothing.
    let offset = v.advance_clock(30 * 86_400)["offset"].as_i64().unwrap();
    // Assertions are checked against the vault's (moved) clock: the
    // server's clock must follow, or its assertions are expired.
    assert_eq!(
        block_on(
            VaultClient::with_certificate(
                http_client(&v.ca, None).unwrap(),
                &v.url,
                &v.tenant,
                &db1.client_id,
                db1.key_pem.as_bytes(),
            )
            .unwrap()
            .token()
        )
        .unwrap_err()
        .status(),
        Some(401)
    );
    let c1 = VaultClient::with_certificate(
        http_client(&v.ca, None).unwrap(),
        &v.url,
        &v.tenant,
        &db1.client_id,
        db1.key_pem.as_bytes(),
    )
    .unwrap()
    .with_clock_offset(offset);
    let r = block_on(officer.call(Method::GET, "/deletedkeys/cmk", None)).unwrap();
    assert!(r["recoveryId"]
        .as_str()
        .unwrap()
        .ends_with("/deletedkeys/cmk"));
    // The dependents can still be listed (by admin) while it is deleted.
    let l = v
        .admin_call(Method::GET, "/keys/cmk/dependents", None)
        .unwrap();
    assert_eq!(l["value"].as_array().unwrap().len(), 2, "{l}");
    block_on(officer.call(Method::POST, "/deletedkeys/cmk/recover", None)).unwrap();

    // Unregister by the owner, and by admin for the other: then disable and
    // purge work.
    block_on(c1.unregister_dependent("cmk", &ver, &s1)).unwrap();
    // Again: idempotent.
    block_on(c1.unregister_dependent("cmk", &ver, &s1)).unwrap();
    let e = block_on(c1.unregister_dependent("absent", &ver, &s1)).unwrap_err();
    assert_eq!(e.status(), Some(404), "{e}");
    assert_eq!(disable(false).unwrap_err().inner_code(), Some("KeyInUse"));
    v.admin_call(
        Method::DELETE,
        &format!("/keys/cmk/{ver}/dependents/{s2}"),
        None,
    )
    .unwrap();
    let l = block_on(c2.list_dependents("cmk", &ver)).unwrap();
    assert_eq!(l["value"].as_array().unwrap().len(), 0, "{l}");
    let k = disable(false).unwrap();
    assert_eq!(k["attributes"]["enabled"], false);
    block_on(officer.call(Method::DELETE, "/keys/cmk", None)).unwrap();
    block_on(officer.call(Method::DELETE, "/deletedkeys/cmk", None)).unwrap();

    // Force: disable and purge with dependents registered, audited as forced.
    let over = key_version(&v, &officer, "other");
    let s3 = atrest_vault::store::new_guid();
    block_on(c2.register_dependent("other", &over, &s3, "db3", "")).unwrap();
    let e = block_on(officer.call(
        Method::PATCH,
        &format!("/keys/other/{over}?force=maybe"),
        Some(json!({"attributes": {"enabled": false}})),
    ))
    .unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    let k = block_on(officer.call(
        Method::PATCH,
        &format!("/keys/other/{over}?force=true"),
        Some(json!({"attributes": {"enabled": false}})),
    ))
    .unwrap();
    assert_eq!(k["attributes"]["enabled"], false);
    block_on(officer.call(Method::DELETE, "/keys/other", None)).unwrap();
    assert_eq!(
        block_on(officer.call(Method::DELETE, "/deletedkeys/other", None))
            .unwrap_err()
            .inner_code(),
        Some("KeyInUse")
    );
    block_on(officer.call(Method::DELETE, "/deletedkeys/other?force=true", None)).unwrap();
    assert!(v
        .admin_call(Method::GET, "/keys/other/dependents", None)
        .is_err());
    let recs = audit_records(&v);
    let forced: Vec<&Value> = recs
        .iter()
        .filter(|r| r["properties"]["forced"] == true)
        .collect();
    let ops: Vec<&str> = forced
        .iter()
        .map(|r| r["operationName"].as_str().unwrap())
        .collect();
    assert_eq!(ops, vec!["KeyUpdate", "KeyPurge"], "{forced:?}");
    assert!(forced
        .iter()
        .all(|r| r["properties"]["details"].to_string().contains(&s3)));
    // The retention period ends in a purge even with dependents (the
    // soft-delete window is the warning, as in Azure); the record names them.
    block_on(officer.call(
        Method::POST,
        "/keys/sched/create",
        Some(json!({"kty": "RSA", "key_size": 2048})),
    ))
    .unwrap();
    let sv = key_version(&v, &officer, "sched");
    let s4 = atrest_vault::store::new_guid();
    block_on(c2.register_dependent("sched", &sv, &s4, "db4", "")).unwrap();
    block_on(officer.call(Method::DELETE, "/keys/sched", None)).unwrap();
    let r = v.advance_clock(91 * 86_400);
    assert!(r["purged"].to_string().contains("sched"), "{r}");
    let e = block_on(officer.call(Method::GET, "/deletedkeys/sched", None)).unwrap_err();
    assert_eq!(e.status(), Some(404), "{e}");
    assert!(v
        .admin_call(Method::GET, "/keys/sched/dependents", None)
        .is_err());
    let recs = audit_records(&v);
    assert!(recs.iter().any(|r| r["operationName"] == "KeyPurge"
        && r["properties"]["keyName"] == "sched"
        && r["properties"]["details"].to_string().contains(&s4)));
    // Unforced ones are not marked.
    assert!(recs.iter().any(|r| r["operationName"] == "KeyPurge"
        && r["properties"]["forced"].is_null()
        && r["resultType"] == "Success"));
    assert_audit_verifies(v.data_dir());
}

#[test]
fn dependents_survive_restart_and_cli_lists_them() {
    let mut v = start();
    let (officer, oid, osecret) = v.identity("officer", &["create", "get", "delete", "purge"]);
    block_on(officer.call(
        Method::POST,
        "/keys/cmk/create",
        Some(json!({"kty": "RSA", "key_size": 2048})),
    ))
    .unwrap();
    let ver = key_version(&v, &officer, "cmk");
    let sid = atrest_vault::store::new_guid();
    block_on(officer.register_dependent("cmk", &ver, &sid, "db-persist", "kept")).unwrap();
    v.terminate();
    v.spawn();
    // New process, new port: a new client for the same identity.
    let officer = VaultClient::new(&v.url, &v.ca, &v.tenant, &oid, &osecret).unwrap();
    let out = run_cli(&[
        "vault",
        "key",
        "dependents",
        "--data",
        v.data_dir().to_str().unwrap(),
        "cmk",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains(&sid) && stdout.contains("db-persist"),
        "{stdout}"
    );
    // The registration is still enforced.
    block_on(officer.call(Method::DELETE, "/keys/cmk", None)).unwrap();
    let e = block_on(officer.call(Method::DELETE, "/deletedkeys/cmk", None)).unwrap_err();
    assert_eq!(e.inner_code(), Some("KeyInUse"), "{e}");
    let out = run_cli(&[
        "vault",
        "key",
        "dependent-remove",
        "--data",
        v.data_dir().to_str().unwrap(),
        "cmk",
        &ver,
        &sid,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    block_on(officer.call(Method::DELETE, "/deletedkeys/cmk", None)).unwrap();
}
