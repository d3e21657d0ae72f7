//! Infrastructure double encryption (scenario 2): the second layer under
//! the data layer, its own keystore, its key checks, fixed at create,
//! and its rotation.

mod common;

use std::fs;
use std::path::Path;

use atrest_crypto::{
    FileHeader, FileId, FileKind, InfraUnitKey, KeySource, SealContext, UnitKey, HEADER_SLOT_SIZE,
    INFRA_CIPHER_NAME, INFRA_NONCE_LEN, INFRA_OVERHEAD, INFRA_TAG_LEN, SEAL_OVERHEAD,
};
use atrest_keystore::{InfraKeyId, InfraKeystore, Keystore, ServiceKeyId};
use atrest_storage::{Engine, EngineOptions, StorageError, HEADER_LEN};
use common::*;

const PAGE: usize = 4096;

fn marker() -> String {
    format!("{}-{}", "ZQX", "INFRA-4417")
}

fn build(engine: &Engine, name: &str, rows: usize) {
    let conn = engine.connect(name).unwrap();
    conn.pragma_update(None, "journal_mode", "delete").unwrap();
    conn.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);")
        .unwrap();
    let tx = conn.unchecked_transaction().unwrap();
    for i in 0..rows {
        tx.execute(
            "INSERT INTO t(v) VALUES (?1)",
            [format!("{} {i} {}", marker(), "z".repeat(i % 90))],
        )
        .unwrap();
    }
    tx.commit().unwrap();
}

fn count_rows(engine: &Engine, name: &str) -> Result<i64, StorageError> {
    engine
        .connect(name)?
        .query_row("SELECT count(*) FROM t NOT INDEXED", [], |r| r.get(0))
        .map_err(StorageError::from_sqlite)
}

/// Reads every page of table `t` (its b-tree and every row's value).
fn scan(engine: &Engine, name: &str) -> Result<i64, StorageError> {
    engine
        .connect(name)?
        .query_row(
            "SELECT count(*) + sum(length(v)) FROM t NOT INDEXED",
            [],
            |r| r.get(0),
        )
        .map_err(StorageError::from_sqlite)
}

fn page_offset(page: usize) -> usize {
    HEADER_LEN as usize + (page - 1) * PAGE
}

/// The newest header slot's claims (no keys needed to read them).
fn header(path: &Path) -> FileHeader {
    let bytes = fs::read(path).unwrap();
    bytes[..HEADER_LEN as usize]
        .chunks(HEADER_SLOT_SIZE)
        .filter_map(|s| FileHeader::decode_unverified(s).ok().flatten())
        .map(|u| u.claims().clone())
        .max_by_key(|h| h.sequence)
        .unwrap()
}

/// What an attacker holding only the infrastructure keystore can do: the
/// file's infrastructure key, unwrapped from its header.
fn infra_key_of(fx: &Fixture, path: &Path) -> InfraUnitKey {
    let h = header(path);
    let rec = h.infra.clone().expect("file has the infrastructure layer");
    let (id, version) = InfraKeyId::parse(&rec.wrapped.kek.key_id).unwrap();
    let p = InfraKeystore::open(fx.infra_keystore())
        .unwrap()
        .protector(id, version)
        .unwrap();
    InfraUnitKey::new(
        &p.unwrap(rec.dek_id, &rec.wrapped, h.file_id, h.kind)
            .unwrap(),
        rec.unit_cipher,
    )
    .unwrap()
}

fn page_ctx(file_id: FileId, page: u64) -> SealContext {
    SealContext {
        file_id,
        kind: FileKind::MainDb,
        class: 1,
        index: page,
        generation: 0,
    }
}

fn infra_fixture() -> Fixture {
    Fixture::with(Scenario::ServiceKeyAndInfra)
}

#[test]
fn marker_scan_stats_and_inspect_with_the_layer_on() {
    let fx = infra_fixture();
    let engine = fx.engine();
    assert!(engine.infrastructure_encryption());
    assert_eq!(engine.reserved_bytes(), SEAL_OVERHEAD + INFRA_OVERHEAD);
    assert_eq!(
        engine.reserved_bytes(),
        76,
        "28 (AES-256-GCM) + 48 (AEGIS-256)"
    );
    let before = engine.stats();
    build(&engine, "r", 500);
    {
        let conn = engine.connect("w").unwrap();
        conn.pragma_update(None, "journal_mode", "wal").unwrap();
        conn.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        conn.set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
            true,
        )
        .unwrap();
        conn.execute_batch("CREATE TABLE t(v TEXT);").unwrap();
        for i in 0..200 {
            conn.execute("INSERT INTO t VALUES (?1)", [format!("{} {i}", marker())])
                .unwrap();
        }
        // A sort that spills to a temp file.
        conn.pragma_update(None, "cache_size", 2).unwrap();
        let n: i64 = conn
            .query_row(
                "SELECT count(*) FROM (SELECT v FROM t ORDER BY v || random())",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(n, 200);
    }
    assert_eq!(count_rows(&engine, "r").unwrap(), 500);
    let s = engine.stats().since(&before);
    // Every unit passed through both layers, each counted on its own.
    assert!(s.infra_units_sealed > 100, "{s:?}");
    assert_eq!(s.infra_units_sealed, s.units_sealed, "{s:?}");
    assert!(s.infra_units_opened > 0);
    assert_eq!(
        s.infra_bytes_sealed,
        s.bytes_sealed + INFRA_OVERHEAD as u64 * s.infra_units_sealed,
        "the infra layer seals INFRA_OVERHEAD (48) bytes more per unit than the data layer"
    );
    let m = marker();
    for f in files_under(&fx.data()) {
        let bytes = fs::read(&f).unwrap();
        assert!(find(&bytes, m.as_bytes()).is_none(), "marker in {f:?}");
        assert!(
            find(&bytes, b"SQLite format 3\0").is_none(),
            "magic in {f:?}"
        );
    }
    // New files: format 5 (AEGIS-256X2 units); a WAL is format 4.
    for (p, format) in [(fx.data().join("r.db"), 5), (fx.data().join("w.db-wal"), 4)] {
        let j = engine.inspect(&p).unwrap();
        assert_eq!(j["layers"], serde_json::json!(["data", "infrastructure"]));
        // A WAL is format 4 (one sealed unit per frame) with either layer set.
        assert_eq!(j["format_version"], format);
        assert_eq!(j["header_verified"], true);
        let il = &j["infrastructure_layer"];
        assert_eq!(il["cipher"], INFRA_CIPHER_NAME);
        assert_eq!(il["cipher"], "AEGIS-256X2");
        assert_eq!(il["wrapped_dek"]["algorithm"], "AEGIS-256");
        assert_eq!(il["unwraps"], true);
        assert_eq!(il["wrapped_dek"]["kek_kind"], "infrastructure");
        assert!(il["wrapped_dek"]["kek_id"]
            .as_str()
            .unwrap()
            .starts_with("infra:"));
        assert!(!j.to_string().contains(&m));
    }
    // Scenario 1 reports one layer and no infrastructure key.
    let plain = Fixture::with(Scenario::ServiceKey);
    let e1 = plain.engine();
    build(&e1, "r", 10);
    let j = e1.inspect(&plain.data().join("r.db")).unwrap();
    assert_eq!(j["layers"], serde_json::json!(["data"]));
    assert!(j["infrastructure_layer"].is_null());
    assert_eq!(e1.stats().infra_units_sealed, 0);
}

#[test]
fn the_setting_is_fixed_at_create() {
    for created_with in [true, false] {
        let sc = if created_with {
            Scenario::ServiceKeyAndInfra
        } else {
            Scenario::ServiceKey
        };
        let fx = Fixture::with(sc);
        build(&fx.engine(), "x", 20);
        let info = fs::read_to_string(fx.data().join("atrest.json")).unwrap();
        let info: serde_json::Value = serde_json::from_str(&info).unwrap();
        assert_eq!(info["infrastructure_encryption"], created_with);
        assert_eq!(info["infrastructure_key"].is_string(), created_with);

        // The other value is refused, naming the rule.
        let other = EngineOptions {
            infrastructure_encryption: Some(!created_with),
            ..fx.opts.clone()
        };
        let err = match Engine::open(&other) {
            Ok(_) => panic!("changed the infrastructure layer after create"),
            Err(e) => e,
        };
        assert!(
            matches!(err, StorageError::InfraFixedAtCreate { .. }),
            "{err}"
        );
        let msg = err.to_string();
        assert!(msg.contains("fixed at create"), "{msg}");
        assert!(
            msg.contains(if created_with {
                "cannot be turned off"
            } else {
                "cannot be turned on"
            }),
            "{msg}"
        );
        // Unspecified means "as created"; data intact.
        let same = EngineOptions {
            infrastructure_encryption: None,
            ..fx.opts.clone()
        };
        let e = Engine::open(&same).unwrap();
        assert_eq!(e.infrastructure_encryption(), created_with);
        assert_eq!(count_rows(&e, "x").unwrap(), 20);
    }

    // A data directory from before this setting existed (no field) is off.
    let fx = Fixture::with(Scenario::ServiceKey);
    build(&fx.engine(), "old", 5);
    let path = fx.data().join("atrest.json");
    let mut info: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    info.as_object_mut()
        .unwrap()
        .remove("infrastructure_encryption");
    fs::write(&path, serde_json::to_vec(&info).unwrap()).unwrap();
    let e = Engine::open(&fx.opts).unwrap();
    assert!(!e.infrastructure_encryption());
    assert_eq!(count_rows(&e, "old").unwrap(), 5);
    drop(e);
    let on = EngineOptions {
        infrastructure_encryption: Some(true),
        ..fx.opts.clone()
    };
    assert!(matches!(
        Engine::open(&on),
        Err(StorageError::InfraFixedAtCreate { .. })
    ));
}

#[test]
fn the_infrastructure_keystore_is_kept_apart() {
    let dir = tempfile::tempdir().unwrap();
    for (infra, what) in [
        (dir.path().join("keystore"), "service keystore"),
        (dir.path().join("keystore/sub"), "service keystore"),
        (dir.path().join("data/iks"), "inside the data directory"),
    ] {
        let opts = EngineOptions {
            infra_keystore_dir: Some(infra),
            ..options(dir.path(), Scenario::ServiceKeyAndInfra)
        };
        let msg = match Engine::open(&opts) {
            Ok(_) => panic!("accepted an infrastructure keystore that is not apart"),
            Err(e) => e.to_string(),
        };
        assert!(msg.contains(what), "{msg}");
    }
    // And a correct one gets its own file names.
    let e = Engine::open(&options(dir.path(), Scenario::ServiceKeyAndInfra)).unwrap();
    drop(e);
    let names: Vec<String> = fs::read_dir(dir.path().join("infra-keystore"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(names[0].starts_with("infra-") && names[0].ends_with("-v1.key"));
    assert!(fs::read_dir(dir.path().join("keystore")).unwrap().all(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with("service-")));
}

/// Replaces the infrastructure master key file with another valid key
/// relabelled with the same id and version (checksum recomputed), so only
/// the key bytes differ.
fn forge_infra_key(fx: &Fixture) -> std::path::PathBuf {
    let ks = InfraKeystore::open(fx.infra_keystore()).unwrap();
    let info: serde_json::Value =
        serde_json::from_slice(&fs::read(fx.data().join("atrest.json")).unwrap()).unwrap();
    let (id, v) = InfraKeyId::parse(info["infrastructure_key"].as_str().unwrap()).unwrap();
    let other = ks.create_master_key().unwrap();
    let mut content = fs::read(ks.key_path(other, 1)).unwrap();
    fs::remove_file(ks.key_path(other, 1)).unwrap();
    content[8..24].copy_from_slice(&id.0);
    content[24..28].copy_from_slice(&v.to_be_bytes());
    let sum = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &content[..60]);
    content[60..76].copy_from_slice(&sum.as_ref()[..16]);
    let path = ks.key_path(id, v);
    fs::write(&path, &content).unwrap();
    path
}

#[test]
fn a_replaced_or_damaged_infrastructure_key_stops_reads_with_a_clear_error() {
    let fx = infra_fixture();
    build(&fx.engine(), "k", 200);
    let db = fx.data().join("k.db");
    let before = fs::read(&db).unwrap();
    let saved = fx.dir.path().join("infra-keystore.saved");
    copy_dir(&fx.infra_keystore(), &saved);

    // Missing infrastructure keystore: names the key and how to point at it.
    fs::remove_dir_all(fx.infra_keystore()).unwrap();
    let msg = match Engine::open(&fx.opts) {
        Ok(_) => panic!("opened without the infrastructure master key"),
        Err(e) => e.to_string(),
    };
    assert!(
        msg.contains("infrastructure master key")
            && msg.contains("was not found")
            && msg.contains("ATREST_INFRA_KEYSTORE"),
        "{msg}"
    );

    // A flipped bit in the key file: damaged, restore from backup.
    copy_dir(&saved, &fx.infra_keystore());
    let key_file = fs::read_dir(fx.infra_keystore())
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut bytes = fs::read(&key_file).unwrap();
    bytes[40] ^= 0x04;
    fs::write(&key_file, &bytes).unwrap();
    let msg = match Engine::open(&fx.opts) {
        Ok(_) => panic!("opened with a damaged infrastructure master key"),
        Err(e) => e.to_string(),
    };
    assert!(
        msg.contains("infrastructure master key file")
            && msg.contains("damaged")
            && msg.contains("restore"),
        "{msg}"
    );

    // Another key under the same name: the service key still works, but the
    // infrastructure layer refuses, naming its key; nothing is written.
    fs::remove_dir_all(fx.infra_keystore()).unwrap();
    copy_dir(&saved, &fx.infra_keystore());
    forge_infra_key(&fx);
    let engine = Engine::open(&fx.opts).unwrap();
    let err = count_rows(&engine, "k").unwrap_err();
    assert!(matches!(err, StorageError::InfraKey { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("infrastructure-layer key")
            && msg.contains("infrastructure key infra:")
            && msg.contains("not the one that wrapped it")
            && msg.contains("restore the original infrastructure keystore"),
        "{msg}"
    );
    drop(engine);
    assert_eq!(
        fs::read(&db).unwrap(),
        before,
        "a failed open must not write"
    );

    // The right key comes back: everything is there.
    fs::remove_dir_all(fx.infra_keystore()).unwrap();
    copy_dir(&saved, &fx.infra_keystore());
    assert_eq!(count_rows(&fx.engine(), "k").unwrap(), 200);
}

#[test]
fn a_replaced_service_key_stops_reads_although_the_infrastructure_key_is_intact() {
    let fx = infra_fixture();
    build(&fx.engine(), "k", 200);
    let keystore = fx.opts.keystore_dir.clone().unwrap();
    let info: serde_json::Value =
        serde_json::from_slice(&fs::read(fx.data().join("atrest.json")).unwrap()).unwrap();
    let want = ServiceKeyId::parse(info["service_key"].as_str().unwrap()).unwrap();
    // Forge: another service key relabelled with our id.
    let other = tempfile::tempdir().unwrap();
    let oks = Keystore::open(other.path().join("ks")).unwrap();
    let oid = oks.create_service_key().unwrap();
    let mut content = fs::read(
        other
            .path()
            .join("ks")
            .join(format!("service-{}.key", oid.to_hex())),
    )
    .unwrap();
    content[8..24].copy_from_slice(&want.0);
    let sum = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &content[..56]);
    content[56..72].copy_from_slice(&sum.as_ref()[..16]);
    let real = keystore.join(format!("service-{}.key", want.to_hex()));
    let saved = fs::read(&real).unwrap();
    fs::write(&real, &content).unwrap();
    let msg = count_rows(&fx.engine(), "k").unwrap_err().to_string();
    assert!(
        msg.contains("service-managed key service:") && msg.contains("not the one that wrapped it"),
        "{msg}"
    );
    fs::write(&real, &saved).unwrap();
    assert_eq!(count_rows(&fx.engine(), "k").unwrap(), 200);
}

/// Each key alone is not enough: with the infrastructure key only, the
/// pages are still data-layer ciphertext; with the service key only, the
/// data layer cannot even be authenticated under the infrastructure layer.
#[test]
fn one_layers_key_alone_does_not_reveal_the_data() {
    let fx = infra_fixture();
    build(&fx.engine(), "k", 300);
    let path = fx.data().join("k.db");
    let bytes = fs::read(&path).unwrap();
    let h = header(&path);
    let pages = (bytes.len() - HEADER_LEN as usize) / PAGE;
    assert!(pages >= 4);

    // Infrastructure key only: strip that layer from every page.
    let infra = infra_key_of(&fx, &path);
    let mut stripped = vec![];
    for p in 1..=pages {
        let mut page = bytes[page_offset(p)..page_offset(p) + PAGE].to_vec();
        infra
            .open(&page_ctx(h.file_id, p as u64), &mut page)
            .expect("the infrastructure layer opens with its own key");
        stripped.extend_from_slice(&page[..PAGE - INFRA_OVERHEAD]);
    }
    assert!(find(&stripped, marker().as_bytes()).is_none());
    assert!(find(&stripped, b"SQLite format 3\0").is_none());

    // Service key only: the data DEK unwraps, but the units under the
    // infrastructure layer do not authenticate.
    let KeySource::Kek(wrapped) = &h.key_source else {
        panic!("database DEK is KEK-wrapped")
    };
    let sid = ServiceKeyId::parse(&wrapped.kek.key_id).unwrap();
    let sp = Keystore::open(fx.opts.keystore_dir.clone().unwrap())
        .unwrap()
        .service_protector(sid)
        .unwrap();
    let dek = atrest_crypto::KeyProtector::unwrap(&sp, h.dek_id, wrapped).unwrap();
    let data = UnitKey::new(&dek, 0).unwrap();
    for p in 1..=pages {
        let mut page = bytes[page_offset(p)..page_offset(p) + PAGE].to_vec();
        assert!(data
            .open(
                &page_ctx(h.file_id, p as u64),
                &mut page[..PAGE - INFRA_OVERHEAD]
            )
            .is_err());
    }
    // Both keys together: the page is plaintext (the layout is as documented).
    let mut page1 = bytes[page_offset(1)..page_offset(1) + PAGE].to_vec();
    infra.open(&page_ctx(h.file_id, 1), &mut page1).unwrap();
    data.open(&page_ctx(h.file_id, 1), &mut page1[..PAGE - INFRA_OVERHEAD])
        .unwrap();
    assert_eq!(&page1[..16], b"SQLite format 3\0");
    assert_eq!(
        page1[20] as usize,
        SEAL_OVERHEAD + INFRA_OVERHEAD,
        "SQLite's reserve is 76 with both layers"
    );
}

#[test]
fn flipped_bits_in_either_layers_nonce_or_tag_are_detected() {
    let fx = infra_fixture();
    let engine = fx.engine();
    build(&engine, "orig", 300);
    let orig = fs::read(fx.data().join("orig.db")).unwrap();
    let end = page_offset(3) + PAGE;
    // Trailer from the end: infra nonce (32), infra tag (16), data nonce
    // (12), data tag (16).
    let infra_tag = end - INFRA_NONCE_LEN - INFRA_TAG_LEN;
    for (case, pos) in [
        ("infra-nonce", end - 1),
        ("infra-nonce0", end - INFRA_NONCE_LEN),
        ("infra-tag", end - INFRA_NONCE_LEN - 1),
        ("infra-tag0", infra_tag),
        ("data-nonce", infra_tag - 1),
        ("data-tag", end - SEAL_OVERHEAD - INFRA_OVERHEAD),
        ("body", page_offset(3) + 7),
    ] {
        // In place of orig.db (a database file is bound to its name).
        let mut bad = orig.clone();
        bad[pos] ^= 0x20;
        fs::write(fx.data().join("orig.db"), &bad).unwrap();
        let err = scan(&engine, "orig").unwrap_err();
        match &err {
            StorageError::Tampered { unit, .. } => assert_eq!(unit, "page 3", "{case}"),
            other => panic!("{case}: expected tampering of page 3, got {other}"),
        }
    }
}

/// A page re-encrypted by the infrastructure layer of another file (even
/// of the same data directory) fails; and one re-encrypted correctly by
/// this file's infrastructure key but moved to another place is still
/// caught by the data layer.
#[test]
fn a_page_sealed_by_another_files_infrastructure_layer_is_detected() {
    let fx = infra_fixture();
    let engine = fx.engine();
    build(&engine, "a", 300);
    build(&engine, "b", 300);
    let pa = fx.data().join("a.db");
    let pb = fx.data().join("b.db");
    let a = fs::read(&pa).unwrap();
    let (ha, hb) = (header(&pa), header(&pb));
    let (ka, kb) = (infra_key_of(&fx, &pa), infra_key_of(&fx, &pb));

    let strip = |page: usize| {
        let mut p = a[page_offset(page)..page_offset(page) + PAGE].to_vec();
        ka.open(&page_ctx(ha.file_id, page as u64), &mut p).unwrap();
        p
    };
    // Each case in place of a.db (a database file is bound to its name).
    let write_case = |_case: &str, page: usize, content: &[u8]| {
        let mut bytes = a.clone();
        bytes[page_offset(page)..page_offset(page) + PAGE].copy_from_slice(content);
        fs::write(&pa, &bytes).unwrap();
    };
    let expect = |name: &str, unit: &str| {
        let err = scan(&engine, "a").unwrap_err();
        match &err {
            StorageError::Tampered { unit: u, .. } => assert_eq!(u, unit, "{name}"),
            other => panic!("{name}: expected tampering of {unit}, got {other}"),
        }
    };

    // a's page 2 (data layer intact) sealed by b's infrastructure key,
    // under b's file id and under a's.
    for (name, ctx_file) in [("by-b", hb.file_id), ("by-b-as-a", ha.file_id)] {
        let mut p = strip(2);
        kb.seal(&page_ctx(ctx_file, 2), &mut p).unwrap();
        write_case(name, 2, &p);
        expect(name, "page 2");
    }
    // a's own infrastructure key, correctly, but page 2's data-layer unit
    // put at page 3: the infrastructure layer passes, the data layer fails.
    let mut p = strip(2);
    ka.seal(&page_ctx(ha.file_id, 3), &mut p).unwrap();
    write_case("moved", 3, &p);
    expect("moved", "page 3");
    // Control: re-sealing in place with a's key reads fine.
    let mut p = strip(2);
    ka.seal(&page_ctx(ha.file_id, 2), &mut p).unwrap();
    write_case("resealed", 2, &p);
    assert_eq!(count_rows(&engine, "a").unwrap(), 300);
}

#[test]
fn rotating_the_infrastructure_key_rewraps_every_file_without_touching_the_data_layer() {
    let fx = infra_fixture();
    let engine = fx.engine();
    build(&engine, "closed", 200);
    // A WAL database left with its WAL, closed.
    {
        let c = engine.connect("walled").unwrap();
        c.pragma_update(None, "journal_mode", "wal").unwrap();
        c.set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
            true,
        )
        .unwrap();
        c.execute_batch("CREATE TABLE t(v); INSERT INTO t VALUES (1), (2), (3);")
            .unwrap();
    }
    // A database open during the rotation.
    let open = engine.connect("open").unwrap();
    open.execute_batch("CREATE TABLE t(v); INSERT INTO t VALUES (1);")
        .unwrap();
    let files = ["closed.db", "walled.db", "walled.db-wal", "open.db"];
    let before: Vec<FileHeader> = files.iter().map(|f| header(&fx.data().join(f))).collect();
    for h in &before {
        assert!(h
            .infra
            .as_ref()
            .unwrap()
            .wrapped
            .kek
            .key_id
            .ends_with("/v1"));
    }

    let before_closed = fs::read(fx.data().join("closed.db")).unwrap();
    let r = engine.rotate_infrastructure_key().unwrap();
    assert!(r.from.ends_with("/v1") && r.to.ends_with("/v2"), "{r:?}");
    let rewrapped: Vec<&str> = r
        .rewrapped
        .iter()
        .map(|p| p.rsplit('/').next().unwrap())
        .collect();
    assert_eq!(rewrapped, ["closed.db", "walled.db", "walled.db-wal"]);
    assert_eq!(r.pending.len(), 1);
    assert!(r.pending[0].ends_with("/open.db"));
    // The open file's header is written with its next commit.
    open.execute("INSERT INTO t VALUES (2)", []).unwrap();

    let info: serde_json::Value =
        serde_json::from_slice(&fs::read(fx.data().join("atrest.json")).unwrap()).unwrap();
    assert_eq!(info["infrastructure_key"], r.to);
    for (f, old) in files.iter().zip(&before) {
        let h = header(&fx.data().join(f));
        let infra = h.infra.as_ref().unwrap();
        assert_eq!(infra.wrapped.kek.key_id, r.to, "{f}");
        // Same infrastructure DEK (rewrap, not re-encryption) ...
        assert_eq!(infra.dek_id, old.infra.as_ref().unwrap().dek_id, "{f}");
        assert_ne!(
            infra.wrapped.bytes,
            old.infra.as_ref().unwrap().wrapped.bytes
        );
        // ... and the data layer's keys untouched.
        assert_eq!(h.dek_id, old.dek_id, "{f}");
        assert_eq!(h.key_source, old.key_source, "{f}");
        assert!(h.sequence > old.sequence, "{f}");
    }
    drop(open);
    drop(engine);

    // Crash safety: a torn newest slot leaves the other one, which opens.
    let closed = fs::read(fx.data().join("closed.db")).unwrap();
    let seq = |slot: &[u8]| {
        FileHeader::decode_unverified(slot)
            .ok()
            .flatten()
            .map(|u| u.claims().sequence)
    };
    let newest =
        if seq(&closed[..HEADER_SLOT_SIZE]) > seq(&closed[HEADER_SLOT_SIZE..HEADER_LEN as usize]) {
            0
        } else {
            1
        };
    let mut torn = closed.clone();
    torn[newest * HEADER_SLOT_SIZE + 100..newest * HEADER_SLOT_SIZE + 400].fill(0xEE);
    // In place of closed.db (a database file is bound to its name).
    fs::write(fx.data().join("closed.db"), &torn).unwrap();
    let e = fx.engine();
    assert_eq!(count_rows(&e, "closed").unwrap(), 200);
    drop(e);
    fs::write(fx.data().join("closed.db"), &closed).unwrap();

    // v1 removed: every file still reads, so none needs it any more.
    let ks = InfraKeystore::open(fx.infra_keystore()).unwrap();
    let (id, _) = InfraKeyId::parse(&r.to).unwrap();
    ks.remove_version(id, 1).unwrap();
    assert_eq!(ks.versions(id).unwrap(), vec![2]);
    let e = fx.engine();
    assert_eq!(count_rows(&e, "closed").unwrap(), 200);
    assert_eq!(count_rows(&e, "walled").unwrap(), 3);
    assert_eq!(count_rows(&e, "open").unwrap(), 2);
    // New files use v2.
    build(&e, "fresh", 5);
    let h = header(&fx.data().join("fresh.db"));
    assert_eq!(h.infra.unwrap().wrapped.kek.key_id, r.to);

    // Both slots of a closed file were rewrapped (each durable before the
    // other was written): with its newest slot torn it still opens, and
    // no slot needs v1.
    fs::write(fx.data().join("closed.db"), &torn).unwrap();
    assert_eq!(count_rows(&e, "closed").unwrap(), 200);
    // A file whose only wrapping is v1 fails clearly once v1 is gone.
    let mut v1_only = before_closed.clone();
    v1_only.truncate(HEADER_LEN as usize);
    v1_only.extend_from_slice(&closed[HEADER_LEN as usize..]);
    fs::write(fx.data().join("closed.db"), &v1_only).unwrap();
    let msg = count_rows(&e, "closed").unwrap_err().to_string();
    assert!(
        msg.contains("/v1") && msg.contains("ATREST_INFRA_KEYSTORE"),
        "{msg}"
    );
}

#[test]
fn rotation_without_the_layer_is_refused() {
    let fx = Fixture::with(Scenario::ServiceKey);
    let err = fx.engine().rotate_infrastructure_key().unwrap_err();
    assert!(err.to_string().contains("no infrastructure layer"), "{err}");
}

fn copy_dir(from: &Path, to: &Path) {
    use std::os::unix::fs::PermissionsExt;
    fs::create_dir_all(to).unwrap();
    fs::set_permissions(to, fs::Permissions::from_mode(0o700)).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// A database written by the pre-release build whose infrastructure layer
/// was XChaCha20-Poly1305 (header format 2, 40-byte trailer, reserve 68) is
/// refused with an error that names the format, never misread.
#[test]
fn a_retired_format_2_file_is_refused_with_a_clear_error() {
    let fx = infra_fixture();
    let engine = fx.engine();
    build(&engine, "new", 50);
    let mut bytes = fs::read(fx.data().join("new.db")).unwrap();
    for slot in bytes[..HEADER_LEN as usize].chunks_mut(HEADER_SLOT_SIZE) {
        if slot.iter().any(|&b| b != 0) {
            assert_eq!(&slot[8..10], &5u16.to_be_bytes(), "format 5 is written");
            slot[8..10].copy_from_slice(&2u16.to_be_bytes());
        }
    }
    fs::write(fx.data().join("old.db"), &bytes).unwrap();
    let err = scan(&engine, "old").unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, StorageError::Header { .. }), "{err:?}: {msg}");
    assert!(msg.contains("old.db"), "{msg}");
    assert!(msg.contains("format version 2"), "{msg}");
    assert!(msg.contains("XChaCha20-Poly1305"), "{msg}");
    assert!(msg.contains("no longer reads"), "{msg}");
}
