"""Full key lifecycle against an atrest vault with the official Azure SDK.

Driven by crates/atrest/tests/vault_sdk.rs, which starts the vault, creates
the identities and passes everything in the environment:
  VAULT_URL, TENANT_ID, REQUESTS_CA_BUNDLE (our CA),
  FULL_ID/FULL_SECRET (every key permission),
  WRAP_ID/WRAP_SECRET (wrapKey and unwrapKey only: no get, so the SDK's
  CryptographyClient cannot fetch the public key and must wrap server-side).
Tokens come from the vault's own token endpoint through azure-identity's
ClientSecretCredential (authority = the vault, instance discovery off).
"""
import base64
import os
import sys

from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceNotFoundError
from azure.identity import ClientSecretCredential
from azure.keyvault.keys import KeyClient, JsonWebKey
from azure.keyvault.keys.crypto import CryptographyClient, KeyWrapAlgorithm

url = os.environ["VAULT_URL"]
tenant = os.environ["TENANT_ID"]


def cred(prefix):
    return ClientSecretCredential(
        tenant_id=tenant,
        client_id=os.environ[prefix + "_ID"],
        client_secret=os.environ[prefix + "_SECRET"],
        authority=url,
        disable_instance_discovery=True,
    )


def check(cond, what):
    if not cond:
        print("FAILED: " + what, file=sys.stderr)
        sys.exit(1)
    print("ok: " + what)


full = cred("FULL")
wrap_only = cred("WRAP")
# The challenge names resource vault.azure.net while the vault runs on
# 127.0.0.1, so the SDK's domain check must be off (as for any private vault).
kc = KeyClient(url, full, verify_challenge_resource=False)

name = "sdk-key"
k = kc.create_rsa_key(name, size=2048, tags={"owner": "sdk-test"})
check(k.key_type == "RSA" and k.properties.enabled, "create_rsa_key")
check(k.id.startswith(url + "/keys/" + name + "/"), "key id is https://host/keys/name/version")
check(len(k.key.n) == 256 and k.key.d is None, "public JWK only (no private part)")

got = kc.get_key(name)
check(got.id == k.id and got.key.n == k.key.n, "get_key")

names = [p.name for p in kc.list_properties_of_keys()]
check(name in names, "list_properties_of_keys")

upd = kc.update_key_properties(name, tags={"owner": "sdk-test", "env": "ci"})
check(upd.properties.tags.get("env") == "ci", "update_key_properties (tags)")

rot = kc.rotate_key(name)
check(rot.properties.version != k.properties.version, "rotate_key gives a new version")
versions = [p.version for p in kc.list_properties_of_key_versions(name)]
check(len(versions) == 2 and k.properties.version in versions, "list_properties_of_key_versions")

dek = os.urandom(32)

# Server-side wrap and unwrap: this identity has no 'get', so the SDK
# cannot read the public key and sends both operations to the vault.
cc_remote = CryptographyClient(rot.id, wrap_only, verify_challenge_resource=False)
try:
    KeyClient(url, wrap_only, verify_challenge_resource=False).get_key(name)
    check(False, "identity without get is refused get_key")
except HttpResponseError as e:
    check(e.status_code == 403 and "get" in str(e.message), "identity without get is refused get_key (403 names 'get')")
w = cc_remote.wrap_key(KeyWrapAlgorithm.rsa_oaep_256, dek)
check(w.key_id == rot.id and len(w.encrypted_key) == 256, "server-side wrap_key RSA-OAEP-256")
u = cc_remote.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, w.encrypted_key)
check(u.key == dek, "server-side unwrap_key returns the DEK")

# Local wrap: with 'get' the SDK fetches the public key and wraps itself;
# the vault must unwrap what the SDK produced.
cc_local = CryptographyClient(rot.id, full, verify_challenge_resource=False)
wl = cc_local.wrap_key(KeyWrapAlgorithm.rsa_oaep_256, dek)
ul = cc_remote.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wl.encrypted_key)
check(ul.key == dek, "vault unwraps what the SDK wrapped locally (RSA-OAEP-256)")
wl1 = cc_local.wrap_key(KeyWrapAlgorithm.rsa_oaep, dek)
check(cc_remote.unwrap_key(KeyWrapAlgorithm.rsa_oaep, wl1.encrypted_key).key == dek, "same for RSA-OAEP (SHA-1)")

# BYOK import of a key made by the cryptography package.
from cryptography.hazmat.primitives.asymmetric import rsa

priv = rsa.generate_private_key(public_exponent=65537, key_size=2048)
nums = priv.private_numbers()


def b(i):
    return i.to_bytes((i.bit_length() + 7) // 8, "big")


jwk = JsonWebKey(kty="RSA", n=b(nums.public_numbers.n), e=b(nums.public_numbers.e), d=b(nums.d),
                 p=b(nums.p), q=b(nums.q), dp=b(nums.dmp1), dq=b(nums.dmq1), qi=b(nums.iqmp))
imp = kc.import_key("sdk-imported", jwk)
check(imp.key.n == b(nums.public_numbers.n) and imp.key.d is None, "import_key (JWK) keeps the public key, returns no private part")

backup = kc.backup_key(name)
check(isinstance(backup, bytes) and len(backup) > 100, "backup_key")

deleted = kc.begin_delete_key(name).result()
check(deleted.recovery_id == url + "/deletedkeys/" + name and deleted.scheduled_purge_date is not None, "begin_delete_key (recoveryId, scheduledPurgeDate)")
dk = kc.get_deleted_key(name)
check(dk.name == name and dk.deleted_date is not None, "get_deleted_key")
check(name in [d.name for d in kc.list_deleted_keys()], "list_deleted_keys")
try:
    kc.create_rsa_key(name, size=2048)
    check(False, "create on a soft-deleted name is refused")
except ResourceExistsError as e:
    check(e.status_code == 409, "create on a soft-deleted name is 409 Conflict")

rec = kc.begin_recover_deleted_key(name).result()
check(rec.name == name and rec.id == rot.id, "begin_recover_deleted_key")
check(kc.get_key(name).id == rot.id, "recovered key is usable again")

kc.begin_delete_key(name).result()
kc.purge_deleted_key(name)
try:
    kc.get_deleted_key(name)
    check(False, "purged key is gone")
except ResourceNotFoundError:
    check(True, "purge_deleted_key: the key is gone")

restored = kc.restore_key_backup(backup)
check(restored.name == name and restored.id == rot.id, "restore_key_backup brings back the key with its versions")
check(len(list(kc.list_properties_of_key_versions(name))) == 2, "restored key has both versions")
check(cc_remote.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, w.encrypted_key).key == dek, "restored key unwraps the old DEK")
try:
    kc.restore_key_backup(backup)
    check(False, "restore refuses an existing name")
except ResourceExistsError as e:
    check(e.status_code == 409, "restore refuses an existing name (409)")

print("PY-LIFECYCLE-OK")
