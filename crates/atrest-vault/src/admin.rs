//! The identity endpoints (an Azure AD look-alike: OpenID discovery, JWKS,
//! client-credentials token) and the admin API.
//!
//! The admin API is authorized by a separate admin credential (the
//! `admin-token` file written at first start), never by data-plane tokens,
//! and data-plane endpoints never accept the admin credential: who manages
//! identities and policies is kept apart from who uses keys.

use std::collections::BTreeSet;

use serde_json::{json, Value};
use zeroize::Zeroizing;

use crate::api::ALL_KEY_OPS;
use crate::auth::{secret_hash, secret_matches};
use crate::b64;
use crate::certauth::{self, AssertionError, CertificateCredential, ASSERTION_TYPE};
use crate::error::ApiError;
use crate::firewall::parse_rule;
use crate::seal::random_bytes;
use crate::server::{App, AuditInfo, Req, Resp};
use crate::store::{canonical_permission, new_guid, Identity, KEY_PERMISSIONS};

fn aad_error(status: u16, error: &str, description: &str) -> ApiError {
    // AAD's token errors are not in Key Vault's envelope; clients (MSAL)
    // read `error` and `error_description`. We keep ApiError for the
    // plumbing and rewrite the body in `token_error_body`.
    ApiError::new(status, error, description.to_string()).inner("aad")
}

/// `/{tenant}/...` endpoints.
pub fn identity_endpoints(app: &App, req: &Req, info: &mut AuditInfo) -> Result<Resp, ApiError> {
    let s: Vec<&str> = req.segments.iter().map(String::as_str).collect();
    let tenant = app.store.snapshot().props.tenant_id.clone();
    let base = format!("{}/{tenant}", req.base());
    info.operation = "Authentication".into();
    let known_tenant = s.first().is_some_and(|t| *t == tenant);
    match (s.as_slice(), req.method.as_str()) {
        ([_, "v2.0", ".well-known", "openid-configuration"], "GET")
        | ([_, ".well-known", "openid-configuration"], "GET") => {
            info.operation = "OpenIdConfiguration".into();
            if !known_tenant {
                return Err(aad_error(
                    400,
                    "invalid_tenant",
                    "AADSTS90002: Tenant not found.",
                ));
            }
            Ok(Resp::ok(json!({
                "issuer": format!("{base}/v2.0"),
                "token_endpoint": format!("{base}/oauth2/v2.0/token"),
                "authorization_endpoint": format!("{base}/oauth2/v2.0/authorize"),
                "jwks_uri": format!("{base}/discovery/v2.0/keys"),
                "response_types_supported": ["token"],
                "subject_types_supported": ["pairwise"],
                "id_token_signing_alg_values_supported": ["ES256"],
                "token_endpoint_auth_methods_supported": ["client_secret_post", "client_secret_basic", "private_key_jwt"],
                "token_endpoint_auth_signing_alg_values_supported": ["ES256"],
                "grant_types_supported": ["client_credentials"],
                "tenant_region_scope": null,
            })))
        }
        ([_, "discovery", "v2.0", "keys"], "GET") | ([_, "discovery", "keys"], "GET") => {
            info.operation = "JwksGet".into();
            if !known_tenant {
                return Err(aad_error(
                    400,
                    "invalid_tenant",
                    "AADSTS90002: Tenant not found.",
                ));
            }
            Ok(Resp::ok(app.signer.jwks()))
        }
        ([_, "oauth2", "v2.0", "token"], "POST") | ([_, "oauth2", "token"], "POST") => {
            info.operation = "TokenIssue".into();
            if !known_tenant {
                return Err(aad_error(
                    400,
                    "invalid_request",
                    "AADSTS90002: Tenant not found. Check the tenant id in the authority.",
                ));
            }
            token(app, req, info, &base)
        }
        _ => Err(ApiError::new(
            404,
            "NotFound",
            format!(
                "{} /{} is not an operation of this vault",
                req.method,
                req.segments.join("/")
            ),
        )),
    }
}

fn token(app: &App, req: &Req, info: &mut AuditInfo, base: &str) -> Result<Resp, ApiError> {
    let form: std::collections::HashMap<String, String> = url::form_urlencoded::parse(&req.body)
        .into_owned()
        .collect();
    let grant = form.get("grant_type").map(String::as_str).unwrap_or("");
    if grant != "client_credentials" {
        return Err(aad_error(
            400,
            "unsupported_grant_type",
            "AADSTS70003: only the client_credentials grant is supported.",
        ));
    }
    let scope = form.get("scope").map(String::as_str).unwrap_or("");
    if !scope.split(' ').any(|s| {
        s.trim_end_matches('/')
            .starts_with("https://vault.azure.net")
    }) {
        return Err(aad_error(
            400,
            "invalid_scope",
            "AADSTS70011: the scope must be https://vault.azure.net/.default.",
        ));
    }
    // client_secret_basic as well as client_secret_post.
    let basic = req
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|h| h.strip_prefix("Basic "))
        .and_then(|b| base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| {
            s.split_once(':')
                .map(|(a, b)| (a.to_string(), b.to_string()))
        });
    let assertion_type = form.get("client_assertion_type");
    let assertion = form.get("client_assertion");
    let secret_given = form.contains_key("client_secret") || basic.is_some();
    let snap = app.store.snapshot();
    let not_found = || {
        aad_error(
            400,
            "unauthorized_client",
            "AADSTS700016: Application not found in the directory of this tenant.",
        )
    };
    let client_id = if assertion_type.is_some() || assertion.is_some() {
        // private_key_jwt (certificate credential).
        info.credential = Some("clientAssertion");
        if secret_given {
            return Err(aad_error(
                400,
                "invalid_request",
                "AADSTS90023: send either a client secret or a client assertion, not both.",
            ));
        }
        if assertion_type.map(String::as_str) != Some(ASSERTION_TYPE) {
            return Err(aad_error(
                400,
                "invalid_request",
                &format!("AADSTS90023: client_assertion_type must be {ASSERTION_TYPE}."),
            ));
        }
        let Some(assertion) = assertion.filter(|a| !a.is_empty()) else {
            return Err(aad_error(
                400,
                "invalid_request",
                "AADSTS900144: client_assertion is required with client_assertion_type.",
            ));
        };
        let claimed = certauth::unverified_issuer(assertion).ok_or_else(|| {
            aad_error(
                400,
                "invalid_request",
                "AADSTS50027: the client assertion is not a well-formed JWT (no iss).",
            )
        })?;
        // client_id is optional; when sent it must be the assertion's issuer.
        if let Some(c) = form.get("client_id") {
            if !c.eq_ignore_ascii_case(&claimed) {
                return Err(aad_error(
                    401,
                    "invalid_client",
                    "AADSTS700021: the client assertion's iss does not match the client_id parameter.",
                ));
            }
        }
        let Some(id) = snap.identities.get(&claimed.to_ascii_lowercase()) else {
            return Err(not_found());
        };
        info.identity = Some(id.clone());
        let Some(cred) = &id.certificate else {
            return Err(aad_error(
                401,
                "invalid_client",
                &format!(
                    "AADSTS700027: identity {} has no certificate credential; it authenticates with its client secret.",
                    id.client_id
                ),
            ));
        };
        let path_v1 = req.segments.get(2).is_some_and(|s| s == "token");
        let mut audiences = vec![format!("{base}/oauth2/v2.0/token")];
        if path_v1 {
            audiences.push(format!("{base}/oauth2/token"));
        }
        let now = app.clock.now();
        let refused = |e: AssertionError| {
            let code = match e {
                AssertionError::BadSignature | AssertionError::WrongCertificate => "AADSTS700027",
                AssertionError::Expired { .. }
                | AssertionError::NotYetValid { .. }
                | AssertionError::TooLong
                | AssertionError::CertificateNotValid { .. } => "AADSTS700024",
                AssertionError::Replayed => "AADSTS700025",
                AssertionError::ReplayCacheFull => "AADSTS90033",
                _ => "AADSTS50027",
            };
            let status = if matches!(e, AssertionError::ReplayCacheFull) {
                503
            } else {
                401
            };
            aad_error(status, "invalid_client", &format!("{code}: {e}."))
        };
        let claims = certauth::verify_assertion(assertion, cred, &id.client_id, &audiences, now)
            .map_err(refused)?;
        app.assertion_replay
            .check_and_remember(&claims, now)
            .map_err(refused)?;
        id.client_id.clone()
    } else {
        info.credential = Some("clientSecret");
        let (client_id, secret) = match (form.get("client_id"), form.get("client_secret"), basic) {
            (Some(c), Some(s), _) => (c.clone(), Zeroizing::new(s.clone())),
            (_, _, Some((c, s))) => (c, Zeroizing::new(s)),
            _ => {
                return Err(aad_error(
                    400,
                    "invalid_request",
                    "AADSTS900144: client_id and client_secret (or client_assertion_type and client_assertion) are required.",
                ))
            }
        };
        let Some(id) = snap
            .identities
            .get(&client_id)
            .or_else(|| snap.identities.get(&client_id.to_ascii_lowercase()))
        else {
            return Err(not_found());
        };
        info.identity = Some(id.clone());
        if id.certificate.is_some() {
            return Err(aad_error(
                401,
                "invalid_client",
                &format!(
                    "AADSTS7000215: identity {} has a certificate credential and no secret; authenticate with a client assertion signed by its key (client_assertion_type={ASSERTION_TYPE}).",
                    id.client_id
                ),
            ));
        }
        if id.secret_sha256.is_empty() || !secret_matches(&secret, &id.secret_sha256) {
            return Err(aad_error(
                401,
                "invalid_client",
                "AADSTS7000215: Invalid client secret provided.",
            ));
        }
        id.client_id.clone()
    };
    let now = app.clock.now();
    let tok = app.signer.issue(
        &format!("{base}/v2.0"),
        &snap.props.tenant_id,
        &client_id,
        now,
        app.token_lifetime,
    );
    Ok(Resp::ok(json!({
        "token_type": "Bearer",
        "expires_in": app.token_lifetime,
        "ext_expires_in": app.token_lifetime,
        "access_token": tok,
    })))
}

/// AAD-style body for token endpoint errors.
pub fn token_error_body(e: &ApiError) -> Option<Value> {
    (e.inner.as_deref() == Some("aad"))
        .then(|| json!({"error": e.code, "error_description": e.message, "error_codes": []}))
}

fn check_admin(app: &App, req: &Req) -> Result<(), ApiError> {
    match req.bearer() {
        Some(t) if secret_matches(t, &app.admin_token_hash) => Ok(()),
        Some(_) => Err(ApiError::new(401, "Unauthorized", "the admin credential is not valid for this vault")),
        None => Err(ApiError::new(
            401,
            "Unauthorized",
            "the admin API needs the vault's admin credential (the admin-token file in the data directory)",
        )),
    }
}

fn identity_json(id: &Identity, tenant: &str) -> Value {
    json!({
        "clientId": id.client_id,
        "name": id.name,
        "kind": id.kind,
        "tenantId": tenant,
        "created": id.created,
        "bypassFirewall": id.bypass_firewall,
        "permissions": {"keys": id.key_permissions},
        "credentialType": if id.certificate.is_some() { "certificate" } else { "secret" },
        "certificateThumbprint": id.certificate.as_ref().map(|c| c.thumbprint_sha256.clone()),
        "certificateSubject": id.certificate.as_ref().map(|c| c.subject.clone()),
        "certificateNotAfter": id.certificate.as_ref().map(|c| c.not_after),
    })
}

/// A client id given by the caller: a GUID (8-4-4-4-12 hex), lowercased.
pub fn parse_client_id(s: &str) -> Result<String, ApiError> {
    let groups: Vec<&str> = s.split('-').collect();
    let ok = groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.chars().all(|c| c.is_ascii_hexdigit()));
    if !ok {
        return Err(ApiError::bad_parameter(format!(
            "clientId '{s}' is not a GUID (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)"
        )));
    }
    Ok(s.to_ascii_lowercase())
}

fn parse_permissions(v: &Value) -> Result<BTreeSet<String>, ApiError> {
    let arr = v.as_array().ok_or_else(|| {
        ApiError::bad_parameter("permissions.keys must be an array of permission names")
    })?;
    let mut out = BTreeSet::new();
    for p in arr {
        let p = p.as_str().unwrap_or("");
        if p.eq_ignore_ascii_case("all") {
            out.extend(KEY_PERMISSIONS.iter().map(|s| s.to_string()));
            continue;
        }
        let c = canonical_permission(p).ok_or_else(|| {
            ApiError::bad_parameter(format!(
                "'{p}' is not a key permission; valid: {} (or all)",
                KEY_PERMISSIONS.join(", ")
            ))
        })?;
        out.insert(c.to_string());
    }
    Ok(out)
}

pub fn dispatch(app: &App, req: &Req, info: &mut AuditInfo) -> Result<Resp, ApiError> {
    info.operation = "AdminAuthentication".into();
    check_admin(app, req)?;
    let s: Vec<&str> = req.segments.iter().map(String::as_str).collect();
    let now = app.clock.now();
    match (&s[1..], req.method.as_str()) {
        (["vault"], "GET") => {
            info.operation = "AdminVaultGet".into();
            Ok(Resp::ok(json!(app.store.snapshot().props)))
        }
        (["vault"], "PATCH") => {
            info.operation = "AdminVaultUpdate".into();
            let body = req.json()?;
            app.mutate(req, info, |st, tx| {
                let p = &mut st.props;
                if let Some(d) = body.get("softDeleteRetentionDays") {
                    let d = d.as_u64().filter(|d| (7..=90).contains(d)).ok_or_else(|| {
                        ApiError::bad_parameter("softDeleteRetentionDays must be 7 to 90")
                    })?;
                    p.soft_delete_retention_days = d as u32;
                }
                match body.get("purgeProtection") {
                    None => {}
                    Some(Value::Bool(true)) => p.purge_protection = true,
                    Some(Value::Bool(false)) if p.purge_protection => {
                        return Err(ApiError::bad_parameter(
                            "purge protection cannot be turned off once it is on",
                        ))
                    }
                    Some(Value::Bool(false)) => {}
                    Some(_) => {
                        return Err(ApiError::bad_parameter(
                            "purgeProtection must be true or false",
                        ))
                    }
                }
                if let Some(b) = body.get("allowRsa15") {
                    p.allow_rsa15 = b.as_bool().ok_or_else(|| {
                        ApiError::bad_parameter("allowRsa15 must be true or false")
                    })?;
                }
                tx.put_props(p)?;
                Ok(Resp::ok(json!(p)))
            })
        }
        (["identities"], "GET") => {
            info.operation = "AdminIdentityList".into();
            let snap = app.store.snapshot();
            let v: Vec<Value> = snap
                .identities
                .values()
                .map(|i| identity_json(i, &snap.props.tenant_id))
                .collect();
            Ok(Resp::ok(json!({"value": v})))
        }
        (["identities"], "POST") => {
            info.operation = "AdminIdentityCreate".into();
            let body = req.json()?;
            let name = body
                .get("name")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty() && n.len() <= 128)
                .ok_or_else(|| ApiError::bad_parameter("'name' (1-128 characters) is required"))?
                .to_string();
            let kind = match body
                .get("kind")
                .and_then(Value::as_str)
                .unwrap_or("servicePrincipal")
            {
                "servicePrincipal" => "servicePrincipal",
                "managedIdentity" => "managedIdentity",
                other => {
                    return Err(ApiError::bad_parameter(format!(
                        "kind '{other}' is not servicePrincipal or managedIdentity"
                    )))
                }
            };
            let perms = match body.get("permissions").and_then(|p| p.get("keys")) {
                Some(p) => parse_permissions(p)?,
                None => BTreeSet::new(),
            };
            let client_id = match body.get("clientId") {
                None | Some(Value::Null) => new_guid(),
                Some(Value::String(c)) => parse_client_id(c)?,
                Some(_) => return Err(ApiError::bad_parameter("clientId must be a GUID string")),
            };
            let certificate = match body.get("certificate") {
                None | Some(Value::Null) => None,
                Some(Value::String(pem)) => Some(
                    CertificateCredential::from_pem(pem)
                        .map_err(|e| ApiError::bad_parameter(e.to_string()))?,
                ),
                Some(_) => return Err(ApiError::bad_parameter("certificate must be a PEM string")),
            };
            if let Some(c) = &certificate {
                if c.not_after <= now {
                    return Err(ApiError::bad_parameter(
                        certauth::CertificateError::Expired.to_string(),
                    ));
                }
            }
            // With a certificate there is no secret at all.
            let secret = certificate
                .is_none()
                .then(|| Zeroizing::new(b64::encode(&random_bytes::<32>())));
            let id = Identity {
                client_id,
                name,
                kind: kind.into(),
                secret_sha256: secret
                    .as_deref()
                    .map(|s| secret_hash(s))
                    .unwrap_or_default(),
                certificate,
                created: now,
                bypass_firewall: body
                    .get("bypassFirewall")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
                key_permissions: perms,
            };
            app.mutate(req, info, |st, tx| {
                if st.identities.contains_key(&id.client_id) {
                    return Err(ApiError::conflict(format!(
                        "an identity with client id {} already exists",
                        id.client_id
                    ))
                    .inner("IdentityExists"));
                }
                tx.put_identity(&id)?;
                st.identities.insert(id.client_id.clone(), id.clone());
                let mut out = identity_json(&id, &st.props.tenant_id);
                if let Some(secret) = &secret {
                    // Shown once; only its hash is stored.
                    out["clientSecret"] = json!(secret.as_str());
                }
                Ok(Resp {
                    status: 201,
                    body: Some(out),
                })
            })
        }
        (["identities", cid], "DELETE") => {
            info.operation = "AdminIdentityDelete".into();
            let cid = cid.to_string();
            app.mutate(req, info, |st, tx| {
                if st.identities.remove(&cid).is_none() {
                    return Err(ApiError::not_found(format!(
                        "identity {cid} does not exist"
                    )));
                }
                tx.delete_identity(&cid)?;
                Ok(Resp {
                    status: 204,
                    body: None,
                })
            })
        }
        (["identities", cid], "PATCH") | (["identities", cid, "policy"], "PUT") => {
            info.operation = "AdminPolicySet".into();
            let body = req.json()?;
            let cid = cid.to_string();
            app.mutate(req, info, |st, tx| {
                let tenant = st.props.tenant_id.clone();
                let id = st
                    .identities
                    .get_mut(&cid)
                    .ok_or_else(|| ApiError::not_found(format!("identity {cid} does not exist")))?;
                if let Some(p) = body.get("permissions").and_then(|p| p.get("keys")) {
                    id.key_permissions = parse_permissions(p)?;
                }
                if let Some(b) = body.get("bypassFirewall") {
                    id.bypass_firewall = b.as_bool().ok_or_else(|| {
                        ApiError::bad_parameter("bypassFirewall must be true or false")
                    })?;
                }
                tx.put_identity(id)?;
                Ok(Resp::ok(identity_json(id, &tenant)))
            })
        }
        (["firewall"], "GET") => {
            info.operation = "AdminFirewallGet".into();
            Ok(Resp::ok(json!(app.store.snapshot().props.firewall)))
        }
        (["firewall"], "PUT") => {
            info.operation = "AdminFirewallSet".into();
            let body = req.json()?;
            let action = match body.get("defaultAction").and_then(Value::as_str) {
                Some(a) if a.eq_ignore_ascii_case("allow") => "Allow",
                Some(a) if a.eq_ignore_ascii_case("deny") => "Deny",
                _ => {
                    return Err(ApiError::bad_parameter(
                        "defaultAction must be Allow or Deny",
                    ))
                }
            };
            let mut rules = Vec::new();
            for r in body
                .get("ipRules")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
            {
                let r = r.as_str().unwrap_or("").to_string();
                parse_rule(&r).map_err(ApiError::bad_parameter)?;
                rules.push(r);
            }
            app.mutate(req, info, |st, tx| {
                st.props.firewall.default_action = action.into();
                st.props.firewall.ip_rules = rules;
                tx.put_props(&st.props)?;
                Ok(Resp::ok(json!(st.props.firewall)))
            })
        }
        (["locks", name], m @ ("PUT" | "DELETE")) => {
            info.operation = if m == "PUT" {
                "AdminLockSet"
            } else {
                "AdminLockRemove"
            }
            .into();
            info.key_name = Some(name.to_string());
            let name = name.to_string();
            let lock = m == "PUT";
            app.mutate(req, info, |st, tx| {
                let e = st
                    .keys
                    .get_mut(&name)
                    .ok_or_else(|| ApiError::key_not_found(&name))?;
                e.state.locked = lock;
                tx.put_state(&name, &e.state)?;
                Ok(Resp::ok(json!({"key": name, "locked": lock})))
            })
        }
        (["keys", name, "dependents"], "GET") => {
            info.operation = "AdminKeyDependentList".into();
            info.key_name = Some(name.to_string());
            crate::api::list_dependents(app, name, "")
        }
        (["keys", name, version, "dependents"], "GET") => {
            info.operation = "AdminKeyDependentList".into();
            info.key_name = Some(name.to_string());
            crate::api::list_dependents(app, name, version)
        }
        (["keys", name, version, "dependents", dep], "DELETE") => {
            info.operation = "AdminKeyDependentUnregister".into();
            info.key_name = Some(name.to_string());
            info.key_version = Some(version.to_string());
            crate::api::unregister_dependent(app, req, info, None, name, version, dep)
        }
        (["clock"], "POST") => {
            info.operation = "AdminClockAdvance".into();
            if !app.test_clock {
                return Err(ApiError::forbidden(
                    "the clock can be moved only on a vault started with --test-clock",
                    "TestClockDisabled",
                ));
            }
            let body = req.json()?;
            let secs = body
                .get("advanceSeconds")
                .and_then(Value::as_i64)
                // Negative moves it back (a test that jumped past a
                // retention period returns to the present).
                .ok_or_else(|| ApiError::bad_parameter("advanceSeconds must be an integer"))?;
            app.clock.advance(secs);
            let m = app.maintenance()?;
            Ok(Resp::ok(
                json!({"now": app.clock.now(), "offset": app.clock.offset(), "purged": m.purged, "rotated": m.rotated}),
            ))
        }
        _ => Err(ApiError::new(
            404,
            "NotFound",
            format!(
                "{} /{} is not an admin operation",
                req.method,
                req.segments.join("/")
            ),
        )),
    }
}

/// Valid key operations for `key_ops` (re-exported for the CLI's help).
pub fn key_ops() -> &'static [&'static str] {
    ALL_KEY_OPS
}
