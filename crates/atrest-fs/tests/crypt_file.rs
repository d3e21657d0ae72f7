//! The sealed file on its own (no FUSE): reads and writes against a model,
//! tampering, replay, torn writes.

mod common;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use atrest_fs::layout::{Layout, GROUP_UNITS, HEADER_LEN, META, SLOT, UNIT};
use atrest_fs::{CryptFile, FsError, RootKey};
use common::{bytes, new_tree, new_tree_with};

fn rw(p: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(p)
        .unwrap()
}

fn read_all(f: &CryptFile) -> Result<Vec<u8>, FsError> {
    let mut v = vec![0u8; f.size() as usize];
    let n = f.read_at(0, &mut v)?;
    v.truncate(n);
    Ok(v)
}

fn flip(p: &Path, off: u64) {
    let f = rw(p);
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, off).unwrap();
    b[0] ^= 0x10;
    f.write_all_at(&b, off).unwrap();
}

#[test]
fn random_reads_and_writes_match_a_model_in_both_layouts_with_and_without_the_infrastructure_layer()
{
    for infra in [false, true] {
        let t = tempfile::tempdir().unwrap();
        let (_p, root, _iks) = new_tree_with(&t.path().join("ks"), t.path(), infra);
        model_test(t.path(), &root);
    }
}

fn model_test(dir: &Path, root: &RootKey) {
    for slots in [1u8, 2] {
        let path = dir.join(format!("f{slots}"));
        let f = CryptFile::create(rw(&path), "f", root, slots).unwrap();
        let mut model: Vec<u8> = vec![];
        for step in 0..300u64 {
            let r = bytes(step * 7 + slots as u64, 16);
            let kind = r[0] % 10;
            let off =
                (u64::from_le_bytes(r[1..9].try_into().unwrap()) % (6 * UNIT as u64)) as usize;
            let len =
                (u32::from_le_bytes(r[9..13].try_into().unwrap()) % (3 * UNIT as u32)) as usize;
            match kind {
                0..=5 => {
                    let d = bytes(step + 1000, len);
                    f.write_at(off as u64, &d).unwrap();
                    if model.len() < off + len {
                        model.resize(off + len, 0);
                    }
                    model[off..off + len].copy_from_slice(&d);
                }
                6 => {
                    f.truncate(off as u64).unwrap();
                    model.resize(off, 0);
                }
                7 => f.sync().unwrap(),
                _ => {
                    let mut buf = vec![0u8; len];
                    let n = f.read_at(off as u64, &mut buf).unwrap();
                    let want = model.get(off..(off + len).min(model.len())).unwrap_or(&[]);
                    assert_eq!(&buf[..n], want, "step {step}");
                }
            }
            assert_eq!(f.size(), model.len() as u64);
        }
        f.close().unwrap();
        drop(f);
        let f = CryptFile::open(rw(&path), "f", root).unwrap();
        assert_eq!(read_all(&f).unwrap(), model, "{slots} slots after reopen");
        // Nothing of the plaintext is in the ciphertext.
        let raw = std::fs::read(&path).unwrap();
        let probe = &model[model.len() / 2..model.len() / 2 + 32];
        assert!(!raw.windows(32).any(|w| w == probe));
    }
}

#[test]
fn a_flipped_bit_swapped_units_or_a_unit_from_another_file_fail_with_the_unit_named() {
    for infra in [false, true] {
        let t = tempfile::tempdir().unwrap();
        let (_p, root, _iks) = new_tree_with(&t.path().join("ks"), t.path(), infra);
        tamper_test(t.path(), &root, infra);
    }
}

fn tamper_test(dir: &Path, root: &RootKey, infra: bool) {
    for slots in [1u8, 2] {
        let a = dir.join(format!("a{slots}"));
        let b = dir.join(format!("b{slots}"));
        for p in [&a, &b] {
            let f = CryptFile::create(rw(p), "x", root, slots).unwrap();
            f.write_at(0, &bytes(1, 4 * UNIT)).unwrap();
            f.sync().unwrap();
            f.write_at(0, &bytes(2, 4 * UNIT)).unwrap(); // second slot in use too
            f.close().unwrap();
        }
        let l = Layout { slots, infra };
        let open_unit1 = |p: &Path| {
            let f = CryptFile::open(rw(p), "x", root)?;
            let mut buf = vec![0u8; UNIT];
            f.read_at(UNIT as u64, &mut buf).map(|_| buf)
        };
        let good = open_unit1(&a).unwrap();
        assert_eq!(good, bytes(2, 4 * UNIT)[UNIT..2 * UNIT]);
        let save = std::fs::read(&a).unwrap();
        // Every slot of unit 1 flipped in turn (the newest one at least).
        for k in 0..slots {
            flip(&a, l.slot_offset(1, k) + META as u64 + 100);
        }
        let e = open_unit1(&a).unwrap_err().to_string();
        assert!(e.contains("unit 1"), "{e}");
        // Two units swapped.
        std::fs::write(&a, &save).unwrap();
        let raw = save.clone();
        let mut sw = raw.clone();
        let (o1, o2) = (l.slot_offset(1, 0) as usize, l.slot_offset(2, 0) as usize);
        let span = l.slot() * slots as usize;
        sw[o1..o1 + span].copy_from_slice(&raw[o2..o2 + span]);
        sw[o2..o2 + span].copy_from_slice(&raw[o1..o1 + span]);
        std::fs::write(&a, &sw).unwrap();
        let e = open_unit1(&a).unwrap_err().to_string();
        assert!(e.contains("unit 1"), "{e}");
        // A unit copied from another file of the same tree.
        let other = std::fs::read(&b).unwrap();
        let mut cp = raw.clone();
        cp[o1..o1 + span].copy_from_slice(&other[o1..o1 + span]);
        std::fs::write(&a, &cp).unwrap();
        let e = open_unit1(&a).unwrap_err().to_string();
        assert!(
            e.contains("unit 1") && e.contains("failed authentication"),
            "{e}"
        );
        std::fs::write(&a, &save).unwrap();
        assert_eq!(open_unit1(&a).unwrap(), good);
    }
}

#[test]
fn a_torn_rewrite_of_a_two_slot_unit_keeps_the_last_synced_version() {
    // PostgreSQL rewrites the last, partly filled WAL page at every commit.
    let t = tempfile::tempdir().unwrap();
    let (_p, root) = new_tree(&t.path().join("ks"), t.path());
    let path = t.path().join("wal");
    let f = CryptFile::create(rw(&path), "wal", &root, 2).unwrap();
    let v1 = bytes(1, UNIT);
    f.write_at(0, &v1).unwrap();
    f.sync().unwrap(); // v1 durable
    let v2 = bytes(2, UNIT);
    f.write_at(0, &v2).unwrap(); // not synced
    drop(f);
    let l = Layout {
        slots: 2,
        infra: false,
    };
    // The unsynced write went to the other slot; tear it.
    let raw = File::open(&path).unwrap();
    let mut m = [0u8; 16];
    let mut seqs = vec![];
    for k in 0..2 {
        raw.read_exact_at(&mut m, l.slot_offset(0, k)).unwrap();
        seqs.push(u64::from_be_bytes(m[..8].try_into().unwrap()));
    }
    let newer = if seqs[0] > seqs[1] { 0 } else { 1 };
    flip(&path, l.slot_offset(0, newer) + SLOT as u64 - 40);
    let f = CryptFile::open(rw(&path), "wal", &root).unwrap();
    assert_eq!(
        read_all(&f).unwrap(),
        v1,
        "the synced version survives a torn rewrite"
    );
}

#[test]
fn a_damaged_or_replayed_newest_version_below_the_last_sync_is_an_error_not_the_older_one() {
    let t = tempfile::tempdir().unwrap();
    let (_p, root) = new_tree(&t.path().join("ks"), t.path());
    let path = t.path().join("wal");
    let f = CryptFile::create(rw(&path), "wal", &root, 2).unwrap();
    f.write_at(0, &bytes(1, UNIT)).unwrap();
    f.sync().unwrap();
    let old = std::fs::read(&path).unwrap();
    f.write_at(0, &bytes(2, UNIT)).unwrap();
    f.sync().unwrap(); // v2 durable; its sequence goes to the map
    f.sync().unwrap(); // and the map is durable
    f.close().unwrap();
    drop(f);
    let l = Layout {
        slots: 2,
        infra: false,
    };
    let now = std::fs::read(&path).unwrap();
    // Damage the newest slot: the older slot is valid but must not be served.
    let newest = (0..2)
        .max_by_key(|&k| {
            let o = l.slot_offset(0, k) as usize;
            u64::from_be_bytes(now[o..o + 8].try_into().unwrap())
        })
        .unwrap();
    flip(&path, l.slot_offset(0, newest) + META as u64 + 7);
    let f = CryptFile::open(rw(&path), "wal", &root);
    let e = match f {
        Err(e) => e.to_string(),
        Ok(f) => read_all(&f).unwrap_err().to_string(),
    };
    assert!(e.contains("unit 0"), "{e}");
    // Replay: the whole unit (both slots) put back as it was after v1.
    std::fs::write(&path, &now).unwrap();
    let mut replay = now.clone();
    let o = l.slot_offset(0, 0) as usize;
    // After v1 only the first slot existed.
    replay[o..o + SLOT].copy_from_slice(&old[o..o + SLOT]);
    replay[o + SLOT..o + 2 * SLOT].fill(0);
    std::fs::write(&path, &replay).unwrap();
    let e = match CryptFile::open(rw(&path), "wal", &root) {
        Err(e) => e.to_string(),
        Ok(f) => read_all(&f).unwrap_err().to_string(),
    };
    assert!(e.contains("older than its last synced version"), "{e}");
}

#[test]
fn a_torn_append_past_the_synced_length_is_dropped_but_a_cut_below_it_is_reported() {
    let t = tempfile::tempdir().unwrap();
    let (_p, root) = new_tree(&t.path().join("ks"), t.path());
    for slots in [1u8, 2] {
        let path = t.path().join(format!("log{slots}"));
        let f = CryptFile::create(rw(&path), "log", &root, slots).unwrap();
        f.write_at(0, &bytes(1, 3 * UNIT)).unwrap();
        f.sync().unwrap();
        f.sync().unwrap();
        f.write_at(3 * UNIT as u64, &bytes(2, UNIT)).unwrap(); // unsynced append
        drop(f);
        let l = Layout {
            slots,
            infra: false,
        };
        // A new unit of a two-slot file has the same sealed version in both
        // slots (one pwrite): one damaged copy loses nothing.
        flip(&path, l.slot_offset(3, 0) + 200);
        if slots == 2 {
            let f = CryptFile::open(rw(&path), "log", &root).unwrap();
            let mut want = bytes(1, 3 * UNIT);
            want.extend_from_slice(&bytes(2, UNIT));
            assert_eq!(read_all(&f).unwrap(), want);
            drop(f);
            flip(&path, l.slot_offset(3, 1) + 300);
        }
        // Every copy torn: the append never happened.
        let f = CryptFile::open(rw(&path), "log", &root).unwrap();
        assert_eq!(read_all(&f).unwrap(), bytes(1, 3 * UNIT));
        drop(f);
        // Cut below the synced length.
        rw(&path).set_len(l.slot_offset(1, 0) + 10).unwrap();
        let e = CryptFile::open(rw(&path), "log", &root)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cut short"), "{e}");
    }
}

#[test]
fn a_file_of_another_tree_or_with_the_wrong_key_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let d1 = t.path().join("t1");
    let d2 = t.path().join("t2");
    std::fs::create_dir_all(&d1).unwrap();
    std::fs::create_dir_all(&d2).unwrap();
    let (p1, root1) = new_tree(&t.path().join("ks1"), &d1);
    let (_p2, root2) = new_tree(&t.path().join("ks2"), &d2);
    let path = d1.join("f");
    let f = CryptFile::create(rw(&path), "f", &root1, 2).unwrap();
    f.write_at(0, b"hello").unwrap();
    f.close().unwrap();
    drop(f);
    let e = CryptFile::open(rw(&path), "f", &root2)
        .unwrap_err()
        .to_string();
    assert!(e.contains("another tree"), "{e}");
    // The root opens again with its own key only.
    assert!(RootKey::open(&d1, &p1, None).is_ok());
    let err = RootKey::open(&d2, &p1, None).unwrap_err().to_string();
    assert!(err.contains("root key"), "{err}");
    let _ = (HEADER_LEN, GROUP_UNITS);
}

#[test]
fn after_a_crash_every_file_reads_its_last_written_or_synced_content() {
    // A crash here is the process going away without `close`: what it
    // wrote is in the OS page cache, as after a SIGKILL.
    let t = tempfile::tempdir().unwrap();
    let (_p, root) = new_tree(&t.path().join("ks"), t.path());
    for slots in [1u8, 2] {
        let path = t.path().join(format!("c{slots}"));
        let mut model: Vec<u8> = vec![];
        let mut f = CryptFile::create(rw(&path), "c", &root, slots).unwrap();
        for step in 0..200u64 {
            let r = bytes(step * 31 + slots as u64, 8);
            let unit = (r[0] % 4) as usize;
            let d = bytes(step + 7, UNIT);
            f.write_at((unit * UNIT) as u64, &d).unwrap();
            if model.len() < (unit + 1) * UNIT {
                model.resize((unit + 1) * UNIT, 0);
            }
            model[unit * UNIT..(unit + 1) * UNIT].copy_from_slice(&d);
            if r[1].is_multiple_of(3) {
                f.sync().unwrap();
            }
            if r[2].is_multiple_of(10) {
                drop(f); // crash
                f = CryptFile::open(rw(&path), "c", &root).unwrap();
                assert_eq!(read_all(&f).unwrap(), model, "{slots} slots, step {step}");
            }
        }
    }
}

#[test]
fn the_infrastructure_layer_needs_its_own_keystore_and_key_and_is_fixed_at_create() {
    let t = tempfile::tempdir().unwrap();
    let d1 = t.path().join("t1");
    let d2 = t.path().join("t2");
    std::fs::create_dir_all(&d1).unwrap();
    std::fs::create_dir_all(&d2).unwrap();
    let (p1, root1, iks1) = new_tree_with(&t.path().join("ks1"), &d1, true);
    let iks1 = iks1.unwrap();
    let path = d1.join("f");
    let f = CryptFile::create(rw(&path), "f", &root1, 2).unwrap();
    f.write_at(0, &bytes(5, 2 * UNIT)).unwrap();
    f.close().unwrap();
    drop(f);
    // The header names both layers; slots are 48 bytes longer.
    let l = Layout {
        slots: 2,
        infra: true,
    };
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        l.physical_len(2),
        "two new units (both slots each), infrastructure-sized slots"
    );
    // Without the infrastructure keystore the tree does not open.
    let e = RootKey::open(&d1, &p1, None).unwrap_err().to_string();
    assert!(e.contains("infrastructure keystore"), "{e}");
    // Another infrastructure keystore (the master key is not in it).
    let other = atrest_keystore::InfraKeystore::open(t.path().join("other-infra")).unwrap();
    other.create_master_key().unwrap();
    let e = RootKey::open(&d1, &p1, Some(&other))
        .unwrap_err()
        .to_string();
    assert!(e.contains("infrastructure"), "{e}");
    // A tree without the layer refuses a keystore: layers are fixed at create.
    let (p2, _root2) = new_tree(&t.path().join("ks2"), &d2);
    let e = RootKey::open(&d2, &p2, Some(&iks1))
        .unwrap_err()
        .to_string();
    assert!(e.contains("without the infrastructure layer"), "{e}");
    // The right keystore opens it, and the content reads back.
    let root = RootKey::open(&d1, &p1, Some(&iks1)).unwrap();
    assert!(root.has_infra());
    let f = CryptFile::open(rw(&path), "f", &root).unwrap();
    assert_eq!(read_all(&f).unwrap(), bytes(5, 2 * UNIT));
    drop(f);
    // A flipped bit in the infrastructure trailer (the AEGIS tag) of both
    // copies of unit 0 fails that unit.
    for k in 0..2 {
        flip(&path, l.slot_offset(0, k) + l.slot() as u64 - 40);
    }
    let f = CryptFile::open(rw(&path), "f", &root).unwrap();
    let mut buf = vec![0u8; UNIT];
    let e = f.read_at(0, &mut buf).unwrap_err().to_string();
    assert!(e.contains("unit 0"), "{e}");
    drop(f);
    // A file of a tree without the layer, put into this one, is refused.
    let foreign = d2.join("g");
    let g = CryptFile::create(rw(&foreign), "g", &_root2, 2).unwrap();
    g.close().unwrap();
    let e = CryptFile::open(rw(&foreign), "g", &root)
        .unwrap_err()
        .to_string();
    assert!(e.contains("g"), "{e}");
}

#[test]
fn a_key_switch_rewraps_the_root_and_every_file_header_and_leaves_nothing_under_the_old_key() {
    use atrest_crypto::KeyProtector;
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("tree");
    std::fs::create_dir_all(d.join("sub/deeper")).unwrap();
    let (p1, root) = new_tree(&t.path().join("ks"), &d);
    let ks = atrest_keystore::Keystore::open(t.path().join("ks")).unwrap();
    let p2 = ks
        .service_protector(ks.create_service_key().unwrap())
        .unwrap();
    let (old_id, new_id) = (p1.current_kek().key_id, p2.current_kek().key_id);
    assert_ne!(old_id, new_id);
    let names = ["a", "sub/b", "sub/deeper/c"];
    for (i, n) in names.iter().enumerate() {
        let f = CryptFile::create(rw(&d.join(n)), n, &root, 2).unwrap();
        f.write_at(0, &bytes(i as u64, 20_000)).unwrap();
        f.close().unwrap();
    }
    let headers = |want: &str, not: &str| {
        for n in names.iter().copied().chain([atrest_fs::ROOT_FILE]) {
            let b = std::fs::read(d.join(n)).unwrap();
            let h = &b[..(HEADER_LEN as usize).min(b.len())];
            let has = |s: &str| h.windows(s.len()).any(|w| w == s.as_bytes());
            assert!(has(want), "{n} does not name {want}");
            assert!(!has(not), "{n} still holds a wrapping under {not}");
        }
    };
    headers(&old_id, &new_id);
    let before_root = std::fs::read(d.join(atrest_fs::ROOT_FILE)).unwrap();
    let tree = atrest_fs::AtrestFs::new(d.clone(), root, atrest_fs::SlotPolicy::AllTwo).tree();
    assert_eq!(tree.rewrap(&p2).unwrap(), names.len());
    // A second run finds nothing left to do.
    assert_eq!(tree.rewrap(&p2).unwrap(), 0);
    drop(tree);
    headers(&new_id, &old_id);
    // Only the new key opens the tree now, and every file reads as written.
    let err = RootKey::open(&d, &p1, None).unwrap_err().to_string();
    assert!(!err.is_empty());
    let root2 = RootKey::open(&d, &p2, None).unwrap();
    for (i, n) in names.iter().enumerate() {
        let f = CryptFile::open(rw(&d.join(n)), n, &root2).unwrap();
        assert_eq!(read_all(&f).unwrap(), bytes(i as u64, 20_000), "{n}");
    }
    // A crash between the two root slots: one slot under each key. Either
    // key opens the tree (the newest slot it can unwrap), which is what
    // lets the next start finish the switch.
    let mut torn = std::fs::read(d.join(atrest_fs::ROOT_FILE)).unwrap();
    let slot = HEADER_LEN as usize / 2;
    torn[..slot].copy_from_slice(&before_root[..slot]);
    std::fs::write(d.join(atrest_fs::ROOT_FILE), &torn).unwrap();
    assert!(RootKey::open(&d, &p2, None).is_ok());
    assert!(RootKey::open(&d, &p1, None).is_ok());
}

/// The DEK ids (data layer, infrastructure layer) a file's header names.
fn deks_of(path: &Path, root: &RootKey) -> (String, Option<String>) {
    let h = atrest_fs::file::header_of(&rw(path), "f", root).unwrap();
    (
        format!("{:?}", h.dek_id),
        h.infra.map(|i| format!("{:?}", i.dek_id)),
    )
}

#[test]
fn a_dek_rotation_of_a_file_in_use_keeps_every_write_and_leaves_no_old_dek() {
    for (infra, slots) in [(false, 1u8), (false, 2), (true, 1), (true, 2)] {
        let t = tempfile::tempdir().unwrap();
        let (_p, root, _iks) = new_tree_with(&t.path().join("ks"), t.path(), infra);
        let path = t.path().join("f");
        let f = CryptFile::create(rw(&path), "f", &root, slots).unwrap();
        let mut model = bytes(1, 40 * UNIT + 100);
        f.write_at(0, &model).unwrap();
        f.sync().unwrap();
        let old = deks_of(&path, &root);
        assert_eq!(old.1.is_some(), infra);
        let tmp = t.path().join("f.new");
        let mut r = f.rekey_begin(rw(&tmp), &root).unwrap();
        // Copy in steps while the file is written: behind the copy, ahead
        // of it, past its end; cut; synced.
        let mut step = 0u64;
        loop {
            let n = f.rekey_copy(&mut r, 3).unwrap();
            step += 1;
            let at = (step * 5 * UNIT as u64 + 17) % (model.len() as u64 + UNIT as u64);
            let d = bytes(100 + step, UNIT / 2);
            f.write_at(at, &d).unwrap();
            let end = at as usize + d.len();
            if model.len() < end {
                model.resize(end, 0);
            }
            model[at as usize..end].copy_from_slice(&d);
            if step == 4 {
                f.truncate(30 * UNIT as u64 + 5).unwrap();
                model.truncate(30 * UNIT + 5);
            }
            if step.is_multiple_of(3) {
                f.sync().unwrap();
            }
            if n == 0 {
                break;
            }
        }
        assert_eq!(read_all(&f).unwrap(), model, "before the switch");
        let switched = f
            .rekey_switch(r, &root.wrapped(), || {
                std::fs::rename(&tmp, &path).unwrap();
                Ok(true)
            })
            .unwrap();
        assert!(switched);
        // The same state goes on, on the new file.
        assert_eq!(read_all(&f).unwrap(), model, "after the switch");
        f.write_at(3, b"after").unwrap();
        model[3..8].copy_from_slice(b"after");
        f.close().unwrap();
        drop(f);
        let new = deks_of(&path, &root);
        assert_ne!(new.0, old.0, "the data layer's DEK is new");
        assert_eq!(new.1.is_some(), infra, "the layers are kept");
        if infra {
            assert_ne!(new.1, old.1, "the infrastructure layer's DEK is new");
        }
        let g = CryptFile::open(rw(&path), "f", &root).unwrap();
        assert_eq!(
            read_all(&g).unwrap(),
            model,
            "{slots} slots, infra {infra}: reopened"
        );
    }
}

#[test]
fn a_tree_rotation_resealing_every_file_is_recorded_until_done_and_skips_what_is_new() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("tree");
    std::fs::create_dir_all(d.join("sub")).unwrap();
    let (prot, root) = new_tree(&t.path().join("ks"), &d);
    let names = ["a", "sub/b", "sub/c"];
    for (i, n) in names.iter().enumerate() {
        let f = CryptFile::create(rw(&d.join(n)), n, &root, 1 + (i % 2) as u8).unwrap();
        f.write_at(0, &bytes(i as u64, 9 * UNIT + i)).unwrap();
        f.close().unwrap();
    }
    let before: Vec<_> = names.iter().map(|n| deks_of(&d.join(n), &root)).collect();
    let tree = atrest_fs::AtrestFs::new(d.clone(), root, atrest_fs::SlotPolicy::AllTwo).tree();
    assert!(tree.rotation().is_none());
    let mark = tree.begin_rotation().unwrap();
    assert_eq!(tree.rotation(), Some(mark), "recorded");
    assert_eq!(mark.units_total, 9 + 10 + 10);
    // A rotation interrupted part-way (the first file copied, not
    // switched): the file stays as it was, and is still pending.
    let pending = tree.rotation_pending(mark.started_unix);
    assert_eq!(pending.len(), 3);
    let mut fr = tree
        .rekey_start(&pending[0].0, mark.started_unix)
        .unwrap()
        .unwrap();
    tree.rekey_copy(&mut fr, 4).unwrap();
    tree.rekey_abort(fr);
    assert_eq!(tree.rotation_pending(mark.started_unix).len(), 3);
    // Then the whole pass.
    for (rel, _) in tree.rotation_pending(mark.started_unix) {
        let mut fr = tree.rekey_start(&rel, mark.started_unix).unwrap().unwrap();
        while tree.rekey_copy(&mut fr, 2).unwrap() > 0 {}
        assert!(tree.rekey_finish(fr).unwrap());
    }
    assert!(tree.rotation_pending(mark.started_unix).is_empty());
    // A file already newer than the mark is not started again.
    assert!(tree
        .rekey_start(std::path::Path::new("a"), mark.started_unix)
        .unwrap()
        .is_none());
    tree.end_rotation().unwrap();
    assert!(tree.rotation().is_none());
    assert!(!d.join(".atrest-rotate").exists());
    drop(tree);
    let root = RootKey::open(&d, &prot, None).unwrap();
    for (i, n) in names.iter().enumerate() {
        assert_ne!(deks_of(&d.join(n), &root).0, before[i].0, "{n}: a new DEK");
        let f = CryptFile::open(rw(&d.join(n)), n, &root).unwrap();
        assert_eq!(read_all(&f).unwrap(), bytes(i as u64, 9 * UNIT + i), "{n}");
    }
}

#[test]
fn a_key_switch_cut_between_a_files_two_header_slots_is_finished_by_the_next_rewrap() {
    use atrest_crypto::KeyProtector;
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("tree");
    std::fs::create_dir_all(&d).unwrap();
    let (p1, root) = new_tree(&t.path().join("ks"), &d);
    let ks = atrest_keystore::Keystore::open(t.path().join("ks")).unwrap();
    let p2 = ks
        .service_protector(ks.create_service_key().unwrap())
        .unwrap();
    let (old_id, new_id) = (p1.current_kek().key_id, p2.current_kek().key_id);
    let f = CryptFile::create(rw(&d.join("a")), "a", &root, 2).unwrap();
    f.write_at(0, &bytes(1, 20_000)).unwrap();
    f.close().unwrap();
    f.write_at(0, b"again").unwrap();
    f.close().unwrap();
    drop(f);
    let before = std::fs::read(d.join("a")).unwrap();
    let has = |b: &[u8], s: &str, slot: usize| {
        let h = &b[slot * 4096..(slot + 1) * 4096];
        h.windows(s.len()).any(|w| w == s.as_bytes())
    };
    assert!(has(&before, &old_id, 0) && has(&before, &old_id, 1));
    let tree = atrest_fs::AtrestFs::new(d.clone(), root, atrest_fs::SlotPolicy::AllTwo).tree();
    assert_eq!(tree.rewrap(&p2).unwrap(), 1);
    // Cut between the slots: the slot written second goes back to what it
    // held, so the newest slot names the new key and the other the old.
    let mut after = std::fs::read(d.join("a")).unwrap();
    let seq = |b: &[u8], k: usize| {
        atrest_crypto::FileHeader::decode_unverified(&b[k * 4096..(k + 1) * 4096])
            .unwrap()
            .unwrap()
            .claims()
            .sequence
    };
    let second = if seq(&after, 0) > seq(&after, 1) {
        0
    } else {
        1
    };
    after[second * 4096..(second + 1) * 4096]
        .copy_from_slice(&before[second * 4096..(second + 1) * 4096]);
    std::fs::write(d.join("a"), &after).unwrap();
    assert!(has(&after, &new_id, 1 - second) && has(&after, &old_id, second));
    // The next rewrap (a restart finishing the switch) rewrites that slot.
    assert_eq!(tree.rewrap(&p2).unwrap(), 1, "the stale slot is found");
    assert_eq!(tree.rewrap(&p2).unwrap(), 0, "and then nothing is left");
    let done = std::fs::read(d.join("a")).unwrap();
    for k in 0..2 {
        assert!(
            !has(&done, &old_id, k),
            "slot {k} still wraps under the old key"
        );
    }
    drop(tree);
    let root2 = RootKey::open(&d, &p2, None).unwrap();
    let f = CryptFile::open(rw(&d.join("a")), "a", &root2).unwrap();
    assert_eq!(&read_all(&f).unwrap()[..5], b"again");
}
