//! Mounts a tree in the foreground until SIGTERM/Enter (for trying atrest-fs
//! by hand): `mount CIPHER_DIR MOUNTPOINT KEYSTORE_DIR`.
use std::path::Path;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let (dir, mnt, ks) = (Path::new(&a[1]), Path::new(&a[2]), Path::new(&a[3]));
    let ks = atrest_keystore::Keystore::open(ks).unwrap();
    let id_file = dir.join("../service-key-id");
    let id = match std::fs::read_to_string(&id_file) {
        Ok(s) => atrest_keystore::ServiceKeyId::parse(s.trim()).unwrap(),
        Err(_) => {
            let id = ks.create_service_key().unwrap();
            std::fs::write(&id_file, id.to_hex()).unwrap();
            id
        }
    };
    let p = ks.service_protector(id).unwrap();
    let root = match atrest_fs::RootKey::open(dir, &p, None) {
        Ok(r) => r,
        Err(_) => atrest_fs::RootKey::create(dir, &p, None).unwrap(),
    };
    let atrest_fs::Mounted { session, stats, .. } =
        atrest_fs::mount(dir, mnt, root, &Default::default()).unwrap();
    eprintln!("mounted; press Enter to unmount");
    let mut s = String::new();
    let _ = std::io::stdin().read_line(&mut s);
    eprintln!("{stats:?}");
    session.umount_and_join().unwrap();
}
