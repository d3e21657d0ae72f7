//! The fork guard of the infrastructure layer's nonce counter, in a process
//! of its own (it changes process-wide state).

use atrest_crypto::{
    note_fork_in_child, CryptoError, FileId, FileKind, InfraDek, InfraUnitCipher, InfraUnitKey,
    SealContext,
};

#[test]
fn instances_made_before_a_fork_refuse_to_seal_after_it() {
    let ctx = SealContext {
        file_id: FileId([1; 16]),
        kind: FileKind::Wal,
        class: 6,
        index: 9,
        generation: 3,
    };
    let dek = InfraDek::generate().unwrap();
    let before = InfraUnitKey::new(&dek, InfraUnitCipher::NEW_FILES).unwrap();
    let mut unit = vec![0u8; 200];
    before.seal(&ctx, &mut unit).unwrap();
    // What the storage engine's pthread_atfork child handler calls.
    note_fork_in_child();
    assert_eq!(
        before.seal(&ctx, &mut [0u8; 200]),
        Err(CryptoError::UsedAfterFork)
    );
    // Reading is unaffected; a fresh instance (a reopened file) seals, with
    // its own prefix, and both open each other's units.
    let after = InfraUnitKey::new(&dek, InfraUnitCipher::NEW_FILES).unwrap();
    let mut again = vec![0u8; 200];
    after.seal(&ctx, &mut again).unwrap();
    assert_ne!(unit[200 - 32..200 - 8], again[200 - 32..200 - 8]);
    before.open(&ctx, &mut again).unwrap();
    after.open(&ctx, &mut unit).unwrap();
}
