//! Permission matrix: for every data-plane operation, an identity holding
//! every key permission except the one it needs is refused with 403 naming
//! that permission, and an identity holding only that permission succeeds.

mod vault_common;
use vault_common::*;

const ALL: &[&str] = &[
    "get",
    "list",
    "update",
    "create",
    "import",
    "delete",
    "recover",
    "backup",
    "restore",
    "purge",
    "encrypt",
    "decrypt",
    "wrapKey",
    "unwrapKey",
    "sign",
    "verify",
    "rotate",
    "getrotationpolicy",
    "setrotationpolicy",
];

#[test]
fn each_operation_needs_exactly_its_permission() {
    let v = start();
    let (_, sid, ssecret) = v.identity("setup", &["all"]);
    let setup = token(&v, &sid, &ssecret);
    let b64 = atrest_vault::b64::encode;
    let mk = |name: &str| {
        let r = v.raw(
            Method::POST,
            &format!("/keys/{name}/create"),
            Some(&setup),
            body(&json!({"kty": "RSA"})),
        );
        assert_eq!(r.status, 200, "{}", r.body);
    };
    for n in ["k", "to-delete-a", "to-delete-b", "bk"] {
        mk(n);
    }
    let wrapped = v.raw(
        Method::POST,
        "/keys/k//wrapkey",
        Some(&setup),
        body(&json!({"alg": "RSA-OAEP-256", "value": b64(&[1u8; 32])})),
    );
    let digest = b64(&[2u8; 32]);
    let sig = v.raw(
        Method::POST,
        "/keys/k//sign",
        Some(&setup),
        body(&json!({"alg": "RS256", "value": digest})),
    );
    let backup = v.raw(Method::POST, "/keys/bk/backup", Some(&setup), None);
    // Deleted keys for recover and purge (one per identity that succeeds).
    for n in ["rec-a", "rec-b", "pur-a", "pur-b"] {
        mk(n);
        assert_eq!(
            v.raw(Method::DELETE, &format!("/keys/{n}"), Some(&setup), None)
                .status,
            200
        );
    }
    // Restore needs the name free.
    assert_eq!(
        v.raw(Method::DELETE, "/keys/bk", Some(&setup), None).status,
        200
    );
    assert_eq!(
        v.raw(Method::DELETE, "/deletedkeys/bk", Some(&setup), None)
            .status,
        204
    );

    struct Case {
        perm: &'static str,
        method: Method,
        path: &'static str,
        body: Option<Value>,
    }
    let c = |perm, method, path, body| Case {
        perm,
        method,
        path,
        body,
    };
    let cases = vec![
        c("get", Method::GET, "/keys/k", None),
        c("list", Method::GET, "/keys", None),
        c("list", Method::GET, "/keys/k/versions", None),
        c("list", Method::GET, "/deletedkeys", None),
        c("get", Method::GET, "/deletedkeys/rec-a", None),
        c(
            "update",
            Method::PATCH,
            "/keys/k",
            Some(json!({"tags": {"a": "b"}})),
        ),
        c(
            "create",
            Method::POST,
            "/keys/new-{who}/create",
            Some(json!({"kty": "RSA"})),
        ),
        c("delete", Method::DELETE, "/keys/to-delete-{who}", None),
        c(
            "recover",
            Method::POST,
            "/deletedkeys/rec-{who}/recover",
            None,
        ),
        c("purge", Method::DELETE, "/deletedkeys/pur-{who}", None),
        c("backup", Method::POST, "/keys/k/backup", None),
        c(
            "restore",
            Method::POST,
            "/keys/restore",
            Some(json!({"value": backup.body["value"]})),
        ),
        c(
            "encrypt",
            Method::POST,
            "/keys/k//encrypt",
            Some(json!({"alg": "RSA-OAEP-256", "value": b64(b"x")})),
        ),
        c(
            "decrypt",
            Method::POST,
            "/keys/k//decrypt",
            Some(json!({"alg": "RSA-OAEP-256", "value": wrapped.body["value"]})),
        ),
        c(
            "wrapKey",
            Method::POST,
            "/keys/k//wrapkey",
            Some(json!({"alg": "RSA-OAEP-256", "value": b64(&[3u8; 32])})),
        ),
        c(
            "unwrapKey",
            Method::POST,
            "/keys/k//unwrapkey",
            Some(json!({"alg": "RSA-OAEP-256", "value": wrapped.body["value"]})),
        ),
        c(
            "sign",
            Method::POST,
            "/keys/k//sign",
            Some(json!({"alg": "RS256", "value": digest})),
        ),
        c(
            "verify",
            Method::POST,
            "/keys/k//verify",
            Some(json!({"alg": "RS256", "digest": digest, "value": sig.body["value"]})),
        ),
        c(
            "getrotationpolicy",
            Method::GET,
            "/keys/k/rotationpolicy",
            None,
        ),
        c(
            "setrotationpolicy",
            Method::PUT,
            "/keys/k/rotationpolicy",
            Some(json!({"lifetimeActions": []})),
        ),
        c("import", Method::PUT, "/keys/imported-{who}", None),
        // Last: it changes the current version the crypto cases above use.
        c("rotate", Method::POST, "/keys/k/rotate", None),
    ];
    let covered: std::collections::BTreeSet<&str> = cases.iter().map(|c| c.perm).collect();
    assert_eq!(covered.len(), ALL.len(), "every permission has a case");

    let jwk = test_jwk();
    for (i, case) in cases.iter().enumerate() {
        let others: Vec<&str> = ALL.iter().copied().filter(|p| *p != case.perm).collect();
        let (_, did, dsecret) = v.identity(&format!("deny-{i}"), &others);
        let (_, aid, asecret) = v.identity(&format!("allow-{i}"), &[case.perm]);
        let deny = token(&v, &did, &dsecret);
        let allow = token(&v, &aid, &asecret);
        let b = if case.perm == "import" {
            Some(json!({"key": jwk}))
        } else {
            case.body.clone()
        };
        let r = v.raw(
            case.method.clone(),
            &case.path.replace("{who}", "a"),
            Some(&deny),
            b.clone().map(|b| serde_json::to_vec(&b).unwrap()),
        );
        assert_error(&r, 403, "Forbidden");
        assert_eq!(r.inner_code(), Some("AccessDenied"), "{}", case.path);
        assert!(
            r.message()
                .contains(&format!("does not have keys {} permission", case.perm)),
            "{} {}: {}",
            case.method,
            case.path,
            r.message()
        );
        let r = v.raw(
            case.method.clone(),
            &case.path.replace("{who}", "b"),
            Some(&allow),
            b.map(|b| serde_json::to_vec(&b).unwrap()),
        );
        assert!(
            r.status < 300,
            "{} {} with only '{}': {} {}",
            case.method,
            case.path,
            case.perm,
            r.status,
            r.body
        );
    }
}

/// A private JWK for import, produced from a fresh aws-lc-rs key through
/// the vault's PKCS#8-to-JWK converter (the same path the CLI uses).
fn test_jwk() -> Value {
    atrest_vault::import::generate_test_jwk()
}
