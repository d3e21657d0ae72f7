//! Data-plane behaviour of a real vault process over HTTPS: key lifecycle
//! through `VaultClient`, and the refusals (tokens, firewall, key state,
//! malformed input, soft-delete rules), each with Azure's error envelope
//! and a 4xx status.

mod vault_common;
use vault_common::*;

fn create_key(v: &TestVault, tok: &str, name: &str, extra: Value) -> Value {
    let mut b = json!({"kty": "RSA", "key_size": 2048});
    if let (Some(o), Some(e)) = (b.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    let r = v.raw(
        Method::POST,
        &format!("/keys/{name}/create"),
        Some(tok),
        body(&b),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    r.body
}

#[test]
fn vault_client_get_wrap_unwrap_and_private_key_never_returned() {
    let v = start();
    let (admin_c, ..) = v.identity("setup", &["create", "get", "list", "rotate", "update"]);
    block_on(admin_c.call(
        Method::POST,
        "/keys/kek/create",
        Some(json!({"kty": "RSA", "key_size": 3072})),
    ))
    .unwrap();
    let (db, ..) = v.identity("db-server", &["get", "wrapKey", "unwrapKey"]);
    let bundle = block_on(db.get_key("kek", None)).unwrap();
    assert_eq!(bundle["key"]["kty"], "RSA");
    assert_eq!(
        atrest_vault::b64::decode(bundle["key"]["n"].as_str().unwrap())
            .unwrap()
            .len(),
        384
    );
    for f in ["d", "p", "q", "dp", "dq", "qi"] {
        assert!(bundle["key"].get(f).is_none(), "private field {f} returned");
    }
    let dek = [7u8; 32];
    let (kid, wrapped) = block_on(db.wrap_key("kek", None, "RSA-OAEP-256", &dek)).unwrap();
    assert_eq!(wrapped.len(), 384);
    let version = kid.rsplit('/').next().unwrap().to_string();
    // Rotation does not break unwrapping with the recorded version.
    block_on(admin_c.call(Method::POST, "/keys/kek/rotate", None)).unwrap();
    let un = block_on(db.unwrap_key("kek", &version, "RSA-OAEP-256", &wrapped)).unwrap();
    assert_eq!(&un[..], &dek);
    let new = block_on(db.get_key("kek", None)).unwrap();
    assert_ne!(new["key"]["kid"].as_str().unwrap(), kid);
    // The server's clock passes the token's expiry while the client still
    // holds it: the client fetches a new token once and carries on.
    v.advance_clock(7200);
    let again = block_on(db.get_key("kek", None)).unwrap();
    assert_eq!(again["key"]["kid"], new["key"]["kid"]);
    // Revoking the identity is a refusal, retried once, then reported.
    let (_, gone_id, gone_secret) = v.identity("gone", &["get"]);
    let gone =
        atrest_vault::VaultClient::new(&v.url, &v.ca, &v.tenant, &gone_id, &gone_secret).unwrap();
    block_on(gone.get_key("kek", None)).unwrap();
    v.admin_call(Method::DELETE, &format!("/identities/{gone_id}"), None)
        .unwrap();
    let e = block_on(gone.get_key("kek", None)).unwrap_err();
    assert!(e.is_refusal(), "{e}");
    // A refusal is a refusal, not an outage.
    let e = block_on(db.call(Method::DELETE, "/keys/kek", None)).unwrap_err();
    assert!(e.is_refusal() && !e.is_outage(), "{e}");
    assert_eq!(e.status(), Some(403));
    // An unreachable vault is an outage.
    let dead =
        atrest_vault::VaultClient::new("https://127.0.0.1:1", &v.ca, &v.tenant, "x", "y").unwrap();
    let e = block_on(dead.get_key("kek", None)).unwrap_err();
    assert!(e.is_outage() && !e.is_refusal(), "{e}");
    // Nothing in the audit log or responses carries private key material:
    // the audit log has no JWK private fields.
    let audit = std::fs::read_to_string(v.audit_path()).unwrap();
    assert!(!audit.contains("\"d\":"));
}

#[test]
fn tokens_missing_expired_forged_other_tenant_and_revoked() {
    let v = start();
    let other = start_with(&["--tenant", "other-tenant"]);
    let (_, id, secret) = v.identity("app", &["list"]);
    let tok = token(&v, &id, &secret);
    let ok = v.raw(Method::GET, "/keys", Some(&tok), None);
    assert_eq!(ok.status, 200, "{}", ok.body);

    let r = v.raw(Method::GET, "/keys", None, None);
    assert_error(&r, 401, "Unauthorized");
    let challenge = r.headers["www-authenticate"].to_str().unwrap().to_string();
    assert_eq!(
        challenge,
        format!(
            "Bearer authorization=\"{}/{}\", resource=\"https://vault.azure.net\"",
            v.url, v.tenant
        )
    );

    // Garbage, a tampered signature, and alg=none.
    assert_error(
        &v.raw(Method::GET, "/keys", Some("not-a-jwt"), None),
        401,
        "Unauthorized",
    );
    let mut parts: Vec<String> = tok.split('.').map(str::to_string).collect();
    parts[2] = atrest_vault::b64::encode(&[0u8; 64]);
    assert_error(
        &v.raw(Method::GET, "/keys", Some(&parts.join(".")), None),
        401,
        "Unauthorized",
    );
    let claims = atrest_vault::b64::decode(&parts[1]).unwrap();
    let none = format!(
        "{}.{}.",
        atrest_vault::b64::encode(br#"{"alg":"none","typ":"JWT"}"#),
        atrest_vault::b64::encode(&claims)
    );
    let r = v.raw(Method::GET, "/keys", Some(&none), None);
    assert_error(&r, 401, "Unauthorized");
    assert!(r.message().contains("none"), "{}", r.message());

    // A token from another vault (another tenant, another signing key).
    let (_, oid, osecret) = other.identity("app", &["list"]);
    let otok = token(&other, &oid, &osecret);
    let r = v.raw(Method::GET, "/keys", Some(&otok), None);
    assert_error(&r, 401, "Unauthorized");
    assert!(
        r.message().contains("signature") || r.message().contains("tenant"),
        "{}",
        r.message()
    );

    // Expired: the test clock moves past the token's lifetime.
    v.advance_clock(3601);
    let r = v.raw(Method::GET, "/keys", Some(&tok), None);
    assert_error(&r, 401, "Unauthorized");
    assert!(r.message().contains("expired"), "{}", r.message());

    // Revoked: deleting the identity kills its live token at once.
    let tok2 = token(&v, &id, &secret);
    assert_eq!(v.raw(Method::GET, "/keys", Some(&tok2), None).status, 200);
    v.admin_call(Method::DELETE, &format!("/identities/{id}"), None)
        .unwrap();
    let r = v.raw(Method::GET, "/keys", Some(&tok2), None);
    assert_error(&r, 401, "Unauthorized");
    assert!(r.message().contains("no longer exists"), "{}", r.message());

    // Token endpoint refusals: wrong secret, unknown client, wrong tenant.
    let http = atrest_vault::client::http_client(&v.ca, None).unwrap();
    let post = |path: String, form: String| {
        block_on(async {
            let r = http
                .post(format!("{}{path}", v.url))
                .header("content-type", "application/x-www-form-urlencoded")
                .body(form)
                .send()
                .await
                .unwrap();
            let s = r.status().as_u16();
            (s, r.json::<Value>().await.unwrap())
        })
    };
    let (_, id2, secret2) = v.identity("app2", &["list"]);
    let (s, b) = post(
        format!("/{}/oauth2/v2.0/token", v.tenant),
        format!("grant_type=client_credentials&client_id={id2}&client_secret={secret2}x&scope=https://vault.azure.net/.default"),
    );
    assert_eq!(
        (s, b["error"].as_str()),
        (401, Some("invalid_client")),
        "{b}"
    );
    let (s, b) = post(
        "/other-tenant/oauth2/v2.0/token".into(),
        format!("grant_type=client_credentials&client_id={id2}&client_secret={secret2}&scope=https://vault.azure.net/.default"),
    );
    assert_eq!(s, 400, "{b}");
    let (s, b) = post(
        format!("/{}/oauth2/v2.0/token", v.tenant),
        format!("grant_type=password&client_id={id2}&client_secret={secret2}"),
    );
    assert_eq!(
        (s, b["error"].as_str()),
        (400, Some("unsupported_grant_type")),
        "{b}"
    );
}

#[test]
fn admin_and_data_plane_credentials_are_separate() {
    let v = start();
    let (_, id, secret) = v.identity("app", &["all"]);
    let tok = token(&v, &id, &secret);
    // The data-plane token does not open the admin API...
    let http = atrest_vault::client::http_client(&v.ca, None).unwrap();
    let r = block_on(atrest_vault::client::send(
        &http,
        Method::GET,
        &format!("{}/admin/identities", v.url),
        Some(&tok),
        None,
    ))
    .unwrap();
    assert_eq!(r.status, 401, "{}", r.body);
    // ...and the admin credential does not open the data plane.
    let r = v.raw(Method::GET, "/keys", Some(&v.admin_token), None);
    assert_error(&r, 401, "Unauthorized");
}

#[test]
fn firewall_deny_allow_rule_and_trusted_bypass() {
    let v = start();
    let (_, id, secret) = v.identity("app", &["list"]);
    let (_, bid, bsecret) = v.identity("trusted", &["list"]);
    v.admin_call(
        Method::PATCH,
        &format!("/identities/{bid}"),
        Some(json!({"bypassFirewall": true})),
    )
    .unwrap();
    let tok = token(&v, &id, &secret);
    let btok = token(&v, &bid, &bsecret);
    v.admin_call(
        Method::PUT,
        "/firewall",
        Some(json!({"defaultAction": "Deny", "ipRules": ["127.0.0.2/32"]})),
    )
    .unwrap();
    let lo1 = Some("127.0.0.1".parse().unwrap());
    let lo2 = Some("127.0.0.2".parse().unwrap());
    let r = v.raw_from(lo1, Method::GET, "/keys", Some(&tok), None);
    assert_error(&r, 403, "Forbidden");
    assert_eq!(r.inner_code(), Some("ForbiddenByFirewall"));
    assert!(
        r.message().contains("Client address: 127.0.0.1"),
        "{}",
        r.message()
    );
    assert_eq!(
        v.raw_from(lo2, Method::GET, "/keys", Some(&tok), None)
            .status,
        200
    );
    assert_eq!(
        v.raw_from(lo1, Method::GET, "/keys", Some(&btok), None)
            .status,
        200
    );
    // Bad rules are refused by the admin API.
    let e = v
        .admin_call(
            Method::PUT,
            "/firewall",
            Some(json!({"defaultAction": "Deny", "ipRules": ["10.0.0.0/40"]})),
        )
        .unwrap_err();
    assert_eq!(e.status(), Some(400));
    v.admin_call(
        Method::PUT,
        "/firewall",
        Some(json!({"defaultAction": "Allow"})),
    )
    .unwrap();
    assert_eq!(
        v.raw_from(lo1, Method::GET, "/keys", Some(&tok), None)
            .status,
        200
    );
}

#[test]
fn disabled_not_yet_valid_and_expired_keys_refuse_crypto() {
    let v = start();
    let (_, id, secret) = v.identity("app", &["all"]);
    let tok = token(&v, &id, &secret);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    create_key(
        &v,
        &tok,
        "future",
        json!({"attributes": {"nbf": now + 86_400}}),
    );
    create_key(
        &v,
        &tok,
        "expiring",
        json!({"attributes": {"exp": now + 86_400}}),
    );
    create_key(&v, &tok, "off", json!({}));
    let wrap = json!({"alg": "RSA-OAEP-256", "value": atrest_vault::b64::encode(&[1u8; 32])});
    let r = v.raw(
        Method::POST,
        "/keys/future//wrapkey",
        Some(&tok),
        body(&wrap),
    );
    assert_error(&r, 403, "Forbidden");
    assert_eq!(r.inner_code(), Some("KeyNotYetValid"));
    assert_eq!(
        v.raw(
            Method::POST,
            "/keys/expiring//wrapkey",
            Some(&tok),
            body(&wrap)
        )
        .status,
        200
    );
    let r = v.raw(
        Method::PATCH,
        "/keys/off",
        Some(&tok),
        body(&json!({"attributes": {"enabled": false}})),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["attributes"]["enabled"], false);
    let r = v.raw(Method::POST, "/keys/off//wrapkey", Some(&tok), body(&wrap));
    assert_eq!(r.inner_code(), Some("KeyDisabled"), "{}", r.body);
    assert_eq!(r.status, 403);
    // get still works on a disabled key (Azure behaviour).
    assert_eq!(
        v.raw(Method::GET, "/keys/off", Some(&tok), None).status,
        200
    );
    v.advance_clock(2 * 86_400);
    let tok = token(&v, &id, &secret);
    let r = v.raw(
        Method::POST,
        "/keys/expiring//wrapkey",
        Some(&tok),
        body(&wrap),
    );
    assert_eq!(r.inner_code(), Some("KeyExpired"), "{}", r.body);
    assert_eq!(
        v.raw(
            Method::POST,
            "/keys/future//wrapkey",
            Some(&tok),
            body(&wrap)
        )
        .status,
        200
    );
    // key_ops restricts operations too.
    create_key(
        &v,
        &tok,
        "wraponly",
        json!({"key_ops": ["wrapKey", "unwrapKey"]}),
    );
    let d = atrest_vault::b64::encode(&[0u8; 32]);
    let r = v.raw(
        Method::POST,
        "/keys/wraponly//sign",
        Some(&tok),
        body(&json!({"alg": "RS256", "value": d})),
    );
    assert_eq!(
        (r.status, r.inner_code()),
        (403, Some("KeyOperationForbidden")),
        "{}",
        r.body
    );
}

#[test]
fn malformed_input_gets_clear_4xx_never_5xx() {
    let v = start();
    let (_, id, secret) = v.identity("app", &["all"]);
    let tok = token(&v, &id, &secret);
    create_key(&v, &tok, "k", json!({}));
    let t = Some(tok.as_str());
    type Case<'a> = (Method, &'a str, Option<Vec<u8>>, u16, &'a str);
    let cases: Vec<Case> = vec![
        (
            Method::POST,
            "/keys/k//wrapkey",
            Some(b"{not json".to_vec()),
            400,
            "not valid JSON",
        ),
        (
            Method::POST,
            "/keys/k//wrapkey",
            Some(b"[1,2]".to_vec()),
            400,
            "JSON object",
        ),
        (
            Method::POST,
            "/keys/k//wrapkey",
            None,
            400,
            "body is missing",
        ),
        (
            Method::POST,
            "/keys/k//wrapkey",
            body(&json!({"alg": "RSA-OAEP-256", "value": "***"})),
            400,
            "base64url",
        ),
        (
            Method::POST,
            "/keys/k//wrapkey",
            body(&json!({"alg": "RSA-OAEP-256"})),
            400,
            "'value' is required",
        ),
        (
            Method::POST,
            "/keys/k//wrapkey",
            body(&json!({"alg": "A256KW", "value": "AAAA"})),
            400,
            "not supported",
        ),
        (
            Method::POST,
            "/keys/k//wrapkey",
            body(&json!({"alg": "RSA-OAEP-256", "value": atrest_vault::b64::encode(&[1u8; 191])})),
            400,
            "1 to 190 bytes",
        ),
        (
            Method::POST,
            "/keys/k//unwrapkey",
            body(&json!({"alg": "RSA-OAEP-256", "value": atrest_vault::b64::encode(&[1u8; 255])})),
            400,
            "exactly 256 bytes",
        ),
        (
            Method::POST,
            "/keys/k//unwrapkey",
            body(&json!({"alg": "RSA-OAEP-256", "value": atrest_vault::b64::encode(&[1u8; 256])})),
            400,
            "could not be decrypted",
        ),
        (
            Method::POST,
            "/keys/k//sign",
            body(&json!({"alg": "RS256", "value": atrest_vault::b64::encode(&[1u8; 20])})),
            400,
            "32-byte digest",
        ),
        (
            Method::POST,
            "/keys/k2/create",
            body(&json!({"kty": "RSA", "key_size": 1024})),
            400,
            "2048, 3072 or 4096",
        ),
        (
            Method::POST,
            "/keys/k2/create",
            body(&json!({"kty": "EC"})),
            400,
            "not supported",
        ),
        (
            Method::POST,
            "/keys/bad_name/create",
            body(&json!({"kty": "RSA"})),
            400,
            "key names",
        ),
        (
            Method::PATCH,
            "/keys/k",
            body(&json!({"attributes": {"exp": "tomorrow"}})),
            400,
            "Unix time",
        ),
        (
            Method::PUT,
            "/keys/imp",
            body(&json!({"key": {"kty": "RSA", "n": "AQAB"}})),
            400,
            "missing",
        ),
        (Method::GET, "/keys?maxresults=0", None, 400, "maxresults"),
        (Method::GET, "/keys/nope", None, 404, "was not found"),
        (Method::GET, "/keys/k/0000", None, 404, "was not found"),
        (
            Method::POST,
            "/keys/k//frobnicate",
            body(&json!({})),
            404,
            "not an operation",
        ),
    ];
    for (m, path, b, status, needle) in cases {
        let r = v.raw(m.clone(), path, t, b);
        assert_eq!(r.status, status, "{m} {path}: {}", r.body);
        assert!(
            r.body["error"]["code"].is_string(),
            "{m} {path}: no envelope: {}",
            r.body
        );
        assert!(
            r.message().contains(needle),
            "{m} {path}: message {:?} lacks {needle:?}",
            r.message()
        );
    }
    // Oversized body: refused with 413 before it is read in full.
    let big = vec![b'a'; 2 * 1024 * 1024];
    let r = v.raw(Method::POST, "/keys/k//wrapkey", t, Some(big));
    assert_eq!(r.status, 413, "{}", r.body);
    assert_eq!(r.error_code(), Some("RequestEntityTooLarge"));
    // Refused before routing, but audited like everything else.
    let audit = std::fs::read_to_string(v.audit_path()).unwrap();
    let last: Value = serde_json::from_str(audit.lines().last().unwrap()).unwrap();
    assert_eq!(last["operationName"], "RequestRejected");
    assert_eq!(last["properties"]["httpStatusCode"], 413);
    // Nothing above was a server error.
    let http = atrest_vault::client::http_client(&v.ca, None).unwrap();
    let m = block_on(async {
        http.get(format!("{}/metrics", v.url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    });
    assert!(
        !m.lines().any(|l| l.contains("status=\"5")),
        "5xx seen:\n{m}"
    );
}

#[test]
fn rsa15_refused_unless_enabled_and_says_why() {
    let v = start();
    let (_, id, secret) = v.identity("app", &["all"]);
    let tok = token(&v, &id, &secret);
    create_key(&v, &tok, "k", json!({}));
    let w = json!({"alg": "RSA1_5", "value": atrest_vault::b64::encode(&[9u8; 32])});
    let r = v.raw(Method::POST, "/keys/k//wrapkey", Some(&tok), body(&w));
    assert_eq!(r.status, 400);
    assert!(r.message().contains("Bleichenbacher"), "{}", r.message());
    v.admin_call(Method::PATCH, "/vault", Some(json!({"allowRsa15": true})))
        .unwrap();
    let r = v.raw(Method::POST, "/keys/k//wrapkey", Some(&tok), body(&w));
    assert_eq!(r.status, 200, "{}", r.body);
    let u = json!({"alg": "RSA1_5", "value": r.body["value"]});
    let r = v.raw(Method::POST, "/keys/k//unwrapkey", Some(&tok), body(&u));
    assert_eq!(
        atrest_vault::b64::decode(r.body["value"].as_str().unwrap()).unwrap(),
        vec![9u8; 32]
    );
}

#[test]
fn encrypt_decrypt_sign_verify_and_paging() {
    let v = start();
    let (_, id, secret) = v.identity("app", &["all"]);
    let tok = token(&v, &id, &secret);
    for i in 0..30 {
        create_key(&v, &tok, &format!("k{i:02}"), json!({}));
    }
    let mut names = vec![];
    let mut next = Some("/keys?maxresults=25".to_string());
    while let Some(path) = next {
        let r = v.raw(Method::GET, &path, Some(&tok), None);
        assert_eq!(r.status, 200, "{}", r.body);
        for item in r.body["value"].as_array().unwrap() {
            names.push(item["kid"].as_str().unwrap().to_string());
        }
        next = r.body["nextLink"]
            .as_str()
            .map(|l| l.strip_prefix(&v.url).unwrap().to_string());
    }
    assert_eq!(names.len(), 30);
    let e = v.raw(
        Method::POST,
        "/keys/k00//encrypt",
        Some(&tok),
        body(&json!({"alg": "RSA-OAEP", "value": "aGVsbG8"})),
    );
    assert_eq!(e.status, 200, "{}", e.body);
    let d = v.raw(
        Method::POST,
        "/keys/k00//decrypt",
        Some(&tok),
        body(&json!({"alg": "RSA-OAEP", "value": e.body["value"]})),
    );
    assert_eq!(d.body["value"], "aGVsbG8");
    let digest = atrest_vault::b64::encode(aws_digest(b"msg").as_slice());
    for alg in ["RS256", "PS256"] {
        let s = v.raw(
            Method::POST,
            "/keys/k00//sign",
            Some(&tok),
            body(&json!({"alg": alg, "value": digest})),
        );
        assert_eq!(s.status, 200, "{}", s.body);
        let ok = v.raw(
            Method::POST,
            "/keys/k00//verify",
            Some(&tok),
            body(&json!({"alg": alg, "digest": digest, "value": s.body["value"]})),
        );
        assert_eq!(ok.body["value"], true);
        let other = atrest_vault::b64::encode(aws_digest(b"other").as_slice());
        let bad = v.raw(
            Method::POST,
            "/keys/k00//verify",
            Some(&tok),
            body(&json!({"alg": alg, "digest": other, "value": s.body["value"]})),
        );
        assert_eq!(bad.body["value"], false);
    }
}

fn aws_digest(m: &[u8]) -> Vec<u8> {
    // SHA-256 via the same library the vault uses (a test-only helper).
    atrest_vault::auth::secret_hash(std::str::from_utf8(m).unwrap())
        .as_bytes()
        .chunks(2)
        .map(|c| u8::from_str_radix(std::str::from_utf8(c).unwrap(), 16).unwrap())
        .collect()
}

#[test]
fn soft_delete_retention_purge_protection_auto_purge_and_lock() {
    let v = start();
    let (_, id, secret) = v.identity("app", &["all"]);
    let tok = token(&v, &id, &secret);
    v.admin_call(
        Method::PATCH,
        "/vault",
        Some(json!({"softDeleteRetentionDays": 7})),
    )
    .unwrap();
    let e = v
        .admin_call(
            Method::PATCH,
            "/vault",
            Some(json!({"softDeleteRetentionDays": 3})),
        )
        .unwrap_err();
    assert_eq!(e.status(), Some(400));
    create_key(&v, &tok, "k", json!({}));
    // Delete lock.
    v.admin_call(Method::PUT, "/locks/k", None).unwrap();
    let r = v.raw(Method::DELETE, "/keys/k", Some(&tok), None);
    assert_error(&r, 409, "Conflict");
    assert!(r.message().contains("lock"), "{}", r.message());
    v.admin_call(Method::DELETE, "/locks/k", None).unwrap();
    let r = v.raw(Method::DELETE, "/keys/k", Some(&tok), None);
    assert_eq!(r.status, 200, "{}", r.body);
    let deleted = r.body["deletedDate"].as_i64().unwrap();
    assert_eq!(
        r.body["scheduledPurgeDate"].as_i64().unwrap(),
        deleted + 7 * 86_400
    );
    assert_eq!(r.body["recoveryId"], format!("{}/deletedkeys/k", v.url));
    // Soft-deleted: not found as a key, name not reusable.
    assert_error(
        &v.raw(Method::GET, "/keys/k", Some(&tok), None),
        404,
        "KeyNotFound",
    );
    let r = v.raw(
        Method::POST,
        "/keys/k/create",
        Some(&tok),
        body(&json!({"kty": "RSA"})),
    );
    assert_error(&r, 409, "Conflict");
    assert_eq!(r.inner_code(), Some("ObjectIsDeletedButRecoverable"));
    // Purge protection refuses purge and cannot be turned off.
    v.admin_call(
        Method::PATCH,
        "/vault",
        Some(json!({"purgeProtection": true})),
    )
    .unwrap();
    assert!(v
        .admin_call(
            Method::PATCH,
            "/vault",
            Some(json!({"purgeProtection": false}))
        )
        .is_err());
    let r = v.raw(Method::DELETE, "/deletedkeys/k", Some(&tok), None);
    assert_error(&r, 403, "Forbidden");
    assert!(r.message().contains("purge protection"), "{}", r.message());
    let r = v.raw(Method::GET, "/deletedkeys/k", Some(&tok), None);
    assert_eq!(r.body["attributes"]["recoveryLevel"], "Recoverable");
    // Six days later it is still there; past the retention it is purged.
    v.advance_clock(6 * 86_400);
    assert_eq!(
        v.raw(Method::GET, "/deletedkeys/k", Some(&tok), None)
            .status,
        401
    ); // token expired meanwhile
    let tok = token(&v, &id, &secret);
    assert_eq!(
        v.raw(Method::GET, "/deletedkeys/k", Some(&tok), None)
            .status,
        200
    );
    let adv = v.advance_clock(86_400 + 1);
    assert_eq!(adv["purged"], json!(["k"]));
    let tok = token(&v, &id, &secret);
    assert_error(
        &v.raw(Method::GET, "/deletedkeys/k", Some(&tok), None),
        404,
        "KeyNotFound",
    );
    // The name is free again.
    create_key(&v, &tok, "k", json!({}));
}

#[test]
fn health_metrics_and_graceful_shutdown() {
    let mut v = start();
    let http = atrest_vault::client::http_client(&v.ca, None).unwrap();
    let h = block_on(async {
        http.get(format!("{}/healthz", v.url))
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    });
    assert_eq!(h["status"], "ok");
    let (_, id, secret) = v.identity("app", &["list"]);
    let tok = token(&v, &id, &secret);
    v.raw(Method::GET, "/keys", Some(&tok), None);
    let m = block_on(async {
        http.get(format!("{}/metrics", v.url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    });
    assert!(
        m.contains("atrest_vault_requests_total{operation=\"KeyList\",status=\"200\"} 1"),
        "{m}"
    );
    assert!(m.contains("atrest_vault_identities 1"), "{m}");
    // Plain HTTP is not served.
    let plain_url = format!("{}/healthz", v.url.replace("https://", "http://"));
    let plain = block_on(async {
        http.get(plain_url)
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    assert!(plain.is_err(), "plain HTTP answered: {plain:?}");
    assert!(v.terminate(), "vault did not exit cleanly on SIGTERM");
    assert!(!v.data_dir().join("vault.url").exists());
    // SIGTERM the moment the URL file appears (as a supervisor could): the
    // vault is already catching it, exits 0 and takes the file away.
    use rustix::process::{kill_process, Pid, Signal};
    let url_file = v.data_dir().join("vault.url");
    for round in 0..10 {
        let mut child = v.serve_command().spawn().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !std::fs::read_to_string(&url_file).is_ok_and(|u| u.ends_with('\n')) {
            assert!(child.try_wait().unwrap().is_none(), "exited during start");
            assert!(std::time::Instant::now() < deadline, "no URL in 60 s");
        }
        kill_process(Pid::from_raw(child.id() as i32).unwrap(), Signal::TERM).unwrap();
        let st = child.wait().unwrap();
        assert!(st.success(), "round {round}: {st}");
        assert!(!url_file.exists(), "round {round}: URL file left behind");
    }
}

#[test]
fn backup_restores_only_into_the_same_tenant_and_key() {
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_atrest"));
    let a = start_with(&["--tenant", "tenant-a"]);
    let replica = TestVault::start_sharing_key(bin, &a, &["--tenant", "tenant-a"]);
    let other_key = start_with(&["--tenant", "tenant-a"]);
    let other_tenant = TestVault::start_sharing_key(bin, &a, &["--tenant", "tenant-b"]);
    let (_, id, secret) = a.identity("app", &["all"]);
    let tok = token(&a, &id, &secret);
    create_key(&a, &tok, "kek", json!({}));
    a.raw(Method::POST, "/keys/kek/rotate", Some(&tok), None);
    let w = a.raw(
        Method::POST,
        "/keys/kek//wrapkey",
        Some(&tok),
        body(&json!({"alg": "RSA-OAEP-256", "value": "AQIDBA"})),
    );
    let blob = a
        .raw(Method::POST, "/keys/kek/backup", Some(&tok), None)
        .body["value"]
        .as_str()
        .unwrap()
        .to_string();
    let restore = |v: &TestVault, blob: &str| {
        let (_, id, secret) = v.identity("restorer", &["restore", "unwrapKey"]);
        let tok = token(v, &id, &secret);
        (
            v.raw(
                Method::POST,
                "/keys/restore",
                Some(&tok),
                body(&json!({"value": blob})),
            ),
            tok,
        )
    };
    let (r, _) = restore(&other_tenant, &blob);
    assert_error(&r, 400, "BadParameter");
    assert_eq!(r.inner_code(), Some("BackupTenantMismatch"), "{}", r.body);
    let (r, _) = restore(&other_key, &blob);
    assert_error(&r, 400, "BadParameter");
    assert!(
        r.message().contains("failed authentication"),
        "{}",
        r.message()
    );
    // A flipped bit in the sealed part is refused the same way.
    let mut raw = atrest_vault::b64::decode(&blob).unwrap();
    let n = raw.len() - 5;
    raw[n] ^= 1;
    let (r, _) = restore(&replica, &atrest_vault::b64::encode(&raw));
    assert_eq!(r.status, 400, "{}", r.body);
    let (r, rtok) = restore(&replica, &blob);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.body["key"]["kid"].as_str().unwrap().rsplit('/').next(),
        w.body["kid"].as_str().unwrap().rsplit('/').next()
    );
    let u = replica.raw(
        Method::POST,
        &format!(
            "/keys/kek/{}/unwrapkey",
            w.body["kid"].as_str().unwrap().rsplit('/').next().unwrap()
        ),
        Some(&rtok),
        body(&json!({"alg": "RSA-OAEP-256", "value": w.body["value"]})),
    );
    assert_eq!(u.body["value"], "AQIDBA", "{}", u.body);
    // Restoring over an existing name is refused.
    let r = replica.raw(
        Method::POST,
        "/keys/restore",
        Some(&rtok),
        body(&json!({"value": blob})),
    );
    assert_error(&r, 409, "Conflict");
}

#[test]
fn rotation_policy_rotates_on_schedule_with_expiry_and_is_audited() {
    let v = start();
    let (_, id, secret) = v.identity("app", &["all"]);
    let tok = token(&v, &id, &secret);
    create_key(&v, &tok, "k", json!({"tags": {"team": "db"}}));
    let bad = v.raw(Method::PUT, "/keys/k/rotationpolicy", Some(&tok), body(&json!({"lifetimeActions": [{"trigger": {"timeAfterCreate": "monthly"}, "action": {"type": "Rotate"}}]})));
    assert_error(&bad, 400, "BadParameter");
    let policy = json!({
        "lifetimeActions": [{"trigger": {"timeAfterCreate": "P30D"}, "action": {"type": "Rotate"}}],
        "attributes": {"expiryTime": "P90D"},
    });
    let r = v.raw(
        Method::PUT,
        "/keys/k/rotationpolicy",
        Some(&tok),
        body(&policy),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let r = v.raw(Method::GET, "/keys/k/rotationpolicy", Some(&tok), None);
    assert_eq!(r.body["attributes"]["expiryTime"], "P90D");
    assert_eq!(v.advance_clock(29 * 86_400)["rotated"], json!([]));
    let m = v.advance_clock(2 * 86_400);
    assert_eq!(m["rotated"], json!(["k"]), "{m}");
    let tok = token(&v, &id, &secret);
    let versions = v.raw(Method::GET, "/keys/k/versions", Some(&tok), None);
    assert_eq!(versions.body["value"].as_array().unwrap().len(), 2);
    let cur = v.raw(Method::GET, "/keys/k", Some(&tok), None);
    let a = &cur.body["attributes"];
    assert_eq!(
        a["exp"].as_i64().unwrap() - a["created"].as_i64().unwrap(),
        90 * 86_400
    );
    assert_eq!(cur.body["tags"]["team"], "db");
    // Not again until another 30 days have passed.
    assert_eq!(v.advance_clock(86_400)["rotated"], json!([]));
    let audit = std::fs::read_to_string(v.audit_path()).unwrap();
    assert!(audit.lines().any(
        |l| l.contains("\"operationName\":\"KeyRotate\"") && l.contains("\"appid\":\"system\"")
    ));
}

#[test]
fn garbage_on_every_route_never_gets_5xx() {
    let v = start();
    let (_, id, secret) = v.identity("app", &["all"]);
    let tok = token(&v, &id, &secret);
    create_key(&v, &tok, "k", json!({}));
    let routes: &[(Method, &str)] = &[
        (Method::POST, "/keys/k/create"),
        (Method::PUT, "/keys/k"),
        (Method::PATCH, "/keys/k"),
        (Method::PATCH, "/keys/k/ffff"),
        (Method::POST, "/keys/k/rotate"),
        (Method::POST, "/keys/k/backup"),
        (Method::POST, "/keys/restore"),
        (Method::PUT, "/keys/k/rotationpolicy"),
        (Method::POST, "/keys/k//wrapkey"),
        (Method::POST, "/keys/k//unwrapkey"),
        (Method::POST, "/keys/k//encrypt"),
        (Method::POST, "/keys/k//decrypt"),
        (Method::POST, "/keys/k//sign"),
        (Method::POST, "/keys/k//verify"),
        (Method::GET, "/keys?maxresults=abc&$skiptoken=zz"),
        (Method::GET, "/keys/k/versions?$skiptoken=-1"),
        (Method::POST, "/deletedkeys/k/recover"),
        (Method::DELETE, "/deletedkeys/k"),
        (Method::GET, "/keys/%00/x"),
        (Method::GET, "/keys/k/x/y/z/w"),
        (Method::POST, "/keys/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa/create"),
    ];
    let bodies: Vec<Vec<u8>> = vec![
        vec![],
        b"{".to_vec(),
        b"null".to_vec(),
        b"[]".to_vec(),
        b"{\"value\": 5, \"alg\": 7, \"digest\": []}".to_vec(),
        b"{\"alg\": \"RSA-OAEP-256\", \"value\": \"\"}".to_vec(),
        b"{\"key\": {\"kty\": \"RSA\", \"n\": 1}}".to_vec(),
        b"{\"attributes\": [], \"tags\": \"x\", \"key_ops\": {}}".to_vec(),
        b"{\"lifetimeActions\": [{}], \"attributes\": {\"expiryTime\": 5}}".to_vec(),
        b"{\"value\": \"QVRSVkIxAAA\"}".to_vec(),
        (0..=255u8).collect(),
        "{\"value\": \"\u{1F600}\"}".as_bytes().to_vec(),
    ];
    for (m, path) in routes {
        for b in &bodies {
            let r = v.raw(m.clone(), path, Some(&tok), Some(b.clone()));
            assert!(
                r.status < 500,
                "{m} {path} {:?}: {} {}",
                String::from_utf8_lossy(b),
                r.status,
                r.body
            );
            if r.status >= 400 {
                assert!(
                    r.body["error"]["message"].is_string(),
                    "{m} {path}: {}",
                    r.body
                );
            }
        }
    }
    // The vault is still healthy and the key usable.
    let w = v.raw(
        Method::POST,
        "/keys/k//wrapkey",
        Some(&tok),
        body(&json!({"alg": "RSA-OAEP-256", "value": "AQID"})),
    );
    assert_eq!(w.status, 200, "{}", w.body);
}
