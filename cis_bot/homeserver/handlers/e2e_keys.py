"""End-to-end encryption keys (Synapse's E2eKeysHandler): device keys, one-time and fallback
keys, cross-signing keys and signatures, stored as uploaded and handed to other devices.

The server takes part in no cryptography: it does not verify signatures (Synapse does, with
ed25519); it checks the shapes Synapse checks and that a signed copy matches the stored key.
There is no federation: other servers' users come back as failures, as unreachable servers do.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import TYPE_CHECKING, Any

from cis_bot.homeserver.errors import (
    BAD_JSON,
    INVALID_PARAM,
    MISSING_PARAM,
    TOO_LARGE,
    MatrixError,
    bad_request,
    not_found,
)
from cis_bot.homeserver.ids import split_id
from cis_bot.homeserver.storage.e2e_keys import canonical_json

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from cis_bot.homeserver.handlers.auth import Requester
    from cis_bot.homeserver.handlers.devices import DeviceHandler
    from cis_bot.homeserver.storage.store import Store

MAX_ONE_TIME_KEYS_PER_ALGORITHM_PER_DEVICE = 500
INVALID_SIGNATURE = "M_INVALID_SIGNATURE"
CROSS_SIGNING_TYPES = {
    "master_key": "master",
    "self_signing_key": "self_signing",
    "user_signing_key": "user_signing",
}


def _is_str_map(value: Any, depth: int = 1) -> bool:
    if not isinstance(value, dict):
        return False
    if depth == 1:
        return all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
    return all(isinstance(k, str) and _is_str_map(v, depth - 1) for k, v in value.items())


def _validate_device_keys(keys: Any) -> None:
    """Synapse's KeyUploadRequestBody.DeviceKeys: one missing field is M_MISSING_PARAM, any
    other mismatch M_BAD_JSON."""
    if keys is None:
        raise bad_request("device_keys must not be null", INVALID_PARAM)
    if not isinstance(keys, dict):
        raise bad_request("device_keys must be an object", BAD_JSON)
    fields: dict[str, Callable[[Any], bool]] = {
        "algorithms": lambda v: isinstance(v, list) and all(isinstance(a, str) for a in v),
        "device_id": lambda v: isinstance(v, str),
        "keys": _is_str_map,
        "signatures": lambda v: _is_str_map(v, 2),
        "user_id": lambda v: isinstance(v, str),
    }
    missing = [name for name in fields if name not in keys]
    wrong = [name for name, ok in fields.items() if name in keys and not ok(keys[name])]
    if len(missing) == 1 and not wrong:
        raise bad_request(f"device_keys.{missing[0]}: Field required", MISSING_PARAM)
    if missing or wrong:
        raise bad_request(f"device_keys: invalid {', '.join(missing + wrong)}", BAD_JSON)


def _validate_key_map(name: str, keys: Any) -> None:
    """one_time_keys / fallback_keys: "<algorithm>:<id>" -> a key string or a signed key."""
    if keys is None:
        return
    if not isinstance(keys, dict):
        raise bad_request(f"{name} must be a mapping", BAD_JSON)
    for key_id, key in keys.items():
        if len(key_id.split(":")) != 2:
            raise bad_request(
                f'Invalid {name} key {key_id!r}. Expected "<algorithm>:<device_id>".', BAD_JSON
            )
        if isinstance(key, str):
            continue
        if (
            not isinstance(key, dict)
            or not isinstance(key.get("key"), str)
            or not _is_str_map(key.get("signatures"), 2)
            or not isinstance(key.get("fallback", False), bool | None)
        ):
            raise bad_request(f"{name}.{key_id}: invalid key object", BAD_JSON)


def _same_one_time_key(stored_json: str, new: Any) -> bool:
    """Synapse's _one_time_keys_match: equal apart from signatures."""
    old = json.loads(stored_json)
    if not isinstance(old, dict) or not isinstance(new, dict):
        return bool(old == new)
    old.pop("signatures", None)
    return bool(old == {k: v for k, v in new.items() if k != "signatures"})


def _strip(key: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in key.items() if k not in ("signatures", "unsigned")}


def _public_key(key: dict[str, Any]) -> tuple[str, str]:
    """(key id, public key) of a cross-signing key ("ed25519:<pub>", "<pub>")."""
    keys = key.get("keys")
    if not isinstance(keys, dict) or len(keys) != 1:
        raise ValueError("a cross-signing key has exactly one key")
    ((key_id, public),) = keys.items()
    if not isinstance(key_id, str) or not key_id.startswith("ed25519:") or not public:
        raise ValueError("not an ed25519 key")
    return key_id, str(public)


def _failure(error: MatrixError) -> dict[str, Any]:
    return {"status": error.status, "errcode": error.errcode, "message": error.message}


class E2EKeysHandler:
    def __init__(self, *, store: Store, devices: DeviceHandler, server_name: str) -> None:
        self.keys = store
        self.devices = devices
        self.server_name = server_name

    # --- /keys/upload ---------------------------------------------------------------------

    def upload(self, requester: Requester, body: dict[str, Any]) -> dict[str, Any]:
        user_id = requester.user_id
        if "device_keys" in body:
            _validate_device_keys(body["device_keys"])
        _validate_key_map("fallback_keys", body.get("fallback_keys"))
        _validate_key_map("one_time_keys", body.get("one_time_keys"))
        device_id = requester.device_id
        if device_id is None:
            raise bad_request("To upload keys, you must pass device_id when authenticating")
        device_keys = body.get("device_keys")
        if device_keys is not None:
            if device_keys["user_id"] != user_id:
                raise bad_request(
                    "Provided `user_id` in `device_keys` does not match that of the "
                    "authenticated user",
                    BAD_JSON,
                )
            if device_keys["device_id"] != device_id:
                raise bad_request(
                    "Provided `device_id` in `device_keys` does not match that of the "
                    "authenticated user device",
                    BAD_JSON,
                )
        if device_keys and self.keys.set_device_keys(user_id, device_id, device_keys):
            self.devices.notify_device_update(user_id)
        one_time_keys = body.get("one_time_keys")
        if one_time_keys:
            self._add_one_time_keys(user_id, device_id, one_time_keys)
        fallback_keys = body.get("fallback_keys")
        if fallback_keys:
            self.keys.set_fallback_keys(user_id, device_id, fallback_keys)
        return {"one_time_key_counts": self.keys.count_one_time_keys(user_id, device_id)}

    def _add_one_time_keys(self, user_id: str, device_id: str, keys: dict[str, Any]) -> None:
        listed = [(*full_id.split(":"), key) for full_id, key in keys.items()]
        existing = self.keys.get_one_time_keys(user_id, device_id, [(a, k) for a, k, _ in listed])
        new = []
        for algorithm, key_id, key in listed:
            stored = existing.get((algorithm, key_id))
            if stored is None:
                new.append((algorithm, key_id, canonical_json(key)))
            elif not _same_one_time_key(stored, key):
                raise bad_request(
                    f"One time key {algorithm}:{key_id} already exists. Old key: {stored}; "
                    f"new key: {key!r}"
                )
        counts = self.keys.count_one_time_keys(user_id, device_id)
        for algorithm, added in Counter(a for a, _, _ in new).items():
            total = counts.get(algorithm, 0) + added
            if total > MAX_ONE_TIME_KEYS_PER_ALGORITHM_PER_DEVICE:
                raise bad_request(
                    f"Uploading {added} more {algorithm} one-time keys would leave the device "
                    f"holding {total}, over the limit of "
                    f"{MAX_ONE_TIME_KEYS_PER_ALGORITHM_PER_DEVICE}",
                    TOO_LARGE,
                )
        self.keys.add_one_time_keys(user_id, device_id, new)

    # --- /keys/query ----------------------------------------------------------------------

    def query(self, requester: Requester, body: dict[str, Any]) -> dict[str, Any]:
        wanted = body.get("device_keys")
        if not isinstance(wanted, dict):
            raise bad_request("'device_keys' must be a JSON object", BAD_JSON)
        if any(
            not isinstance(ids, list) or not all(isinstance(i, str) for i in ids)
            for ids in wanted.values()
        ):
            raise bad_request("'device_keys' values must be a list of strings", BAD_JSON)
        valid = [u for u in wanted if self._valid_user_id(u)]
        users = [u for u in valid if self._is_local(u)]
        pairs: list[tuple[str, str | None]] = []
        for user_id in users:
            pairs += [(user_id, d) for d in wanted[user_id]] or [(user_id, None)]
        found = self.keys.get_device_keys(pairs)
        device_keys: dict[str, Any] = {}
        for user_id in users:
            devices = device_keys.setdefault(user_id, {})
            for device_id, (keys, name) in found.get(user_id, {}).items():
                devices[device_id] = self._device_with_signatures(user_id, device_id, keys, name)
        result: dict[str, Any] = {
            "device_keys": device_keys,
            "failures": self._remote_failures(u for u in valid if not self._is_local(u)),
        }
        result.update(self._cross_signing_keys(users, requester.user_id))
        return result

    def _is_local(self, user_id: str) -> bool:
        return user_id.endswith(f":{self.server_name}")

    @staticmethod
    def _remote_failures(user_ids: Iterable[str]) -> dict[str, Any]:
        """Other servers' users: this one does not federate, so their servers are unreachable
        (what Synapse reports for a server it cannot reach)."""
        return {
            user_id.split(":", 1)[1]: {"status": 503, "message": "Not ready for retry"}
            for user_id in user_ids
        }

    @staticmethod
    def _valid_user_id(user_id: str) -> bool:
        try:
            split_id(user_id, "@")
        except ValueError:
            return False
        return True

    def _device_with_signatures(
        self, user_id: str, device_id: str, keys: dict[str, Any], name: str | None
    ) -> dict[str, Any]:
        """The device's keys, with the signatures its owner's self-signing key added later
        and its display name in ``unsigned``."""
        extra = self.keys.get_cross_signing_signatures(user_id, user_id, device_id)
        if extra:
            signatures = dict(keys.get("signatures", {}))
            signatures[user_id] = {**signatures.get(user_id, {}), **extra}
            keys = {**keys, "signatures": signatures}
        return {**keys, "unsigned": {"device_display_name": name} if name is not None else {}}

    def cross_signing_key(
        self, user_id: str, key_type: str, from_user_id: str | None = None
    ) -> dict[str, Any] | None:
        """A cross-signing key with the signatures uploaded for it (by its owner, and by
        ``from_user_id``: a user sees their own signatures of others' keys)."""
        key = self.keys.get_cross_signing_keys(user_id).get(key_type)
        if key is None:
            return None
        try:
            _, public = _public_key(key)
        except ValueError:
            return key
        for signer in dict.fromkeys((user_id, from_user_id)):
            if signer is None:
                continue
            extra = self.keys.get_cross_signing_signatures(signer, user_id, public)
            if extra:
                signatures = dict(key.get("signatures", {}))
                signatures[signer] = {**signatures.get(signer, {}), **extra}
                key = {**key, "signatures": signatures}
        return key

    def _cross_signing_keys(self, users: list[str], from_user_id: str) -> dict[str, Any]:
        master: dict[str, Any] = {}
        self_signing: dict[str, Any] = {}
        user_signing: dict[str, Any] = {}
        for user_id in users:
            found = self.cross_signing_key(user_id, "master", from_user_id)
            if found is not None:
                master[user_id] = found
            found = self.cross_signing_key(user_id, "self_signing", from_user_id)
            if found is not None:
                self_signing[user_id] = found
        if from_user_id in users:  # only one's own user-signing key is visible
            found = self.cross_signing_key(from_user_id, "user_signing", from_user_id)
            if found is not None:
                user_signing[from_user_id] = found
        return {
            "master_keys": master,
            "self_signing_keys": self_signing,
            "user_signing_keys": user_signing,
        }

    # --- /keys/claim ----------------------------------------------------------------------

    def claim(self, body: dict[str, Any]) -> dict[str, Any]:
        wanted = body.get("one_time_keys", {})
        if not isinstance(wanted, dict):
            raise bad_request("'one_time_keys' must be a JSON object", BAD_JSON)
        claimed: dict[str, dict[str, dict[str, Any]]] = {}
        remote: list[str] = []
        for user_id, devices in wanted.items():
            if not isinstance(devices, dict):
                raise bad_request("'one_time_keys' values must be JSON objects", BAD_JSON)
            if not self._valid_user_id(user_id):
                raise bad_request(f"Invalid user id: {user_id}", INVALID_PARAM)
            if not self._is_local(user_id):
                remote.append(user_id)
                continue
            for device_id, algorithm in devices.items():
                if not isinstance(algorithm, str):
                    raise bad_request("an algorithm must be a string", BAD_JSON)
                keys = self.keys.claim_one_time_keys(user_id, device_id, algorithm, 1)
                if not keys:
                    fallback = self.keys.claim_fallback_key(
                        user_id, device_id, algorithm, mark_used=True
                    )
                    keys = [fallback] if fallback is not None else []
                for key_id, key in keys:
                    claimed.setdefault(user_id, {}).setdefault(device_id, {})[key_id] = key
        return {"one_time_keys": claimed, "failures": self._remote_failures(remote)}

    # --- cross-signing --------------------------------------------------------------------

    def has_cross_signing(self, user_id: str) -> bool:
        return "master" in self.keys.get_cross_signing_keys(user_id)

    def changes_keys(self, user_id: str, body: dict[str, Any]) -> bool:
        """Whether the upload would insert or replace any key (Synapse's has_different_keys:
        re-uploading the stored keys needs no authentication)."""
        stored = self.keys.get_cross_signing_keys(user_id)
        return any(
            field in body and canonical_json(body[field]) != canonical_json(stored.get(kind))
            for field, kind in CROSS_SIGNING_TYPES.items()
        )

    def upload_signing_keys(self, user_id: str, body: dict[str, Any]) -> dict[str, Any]:
        stored = self.keys.get_cross_signing_keys(user_id)
        master = body.get("master_key") if "master_key" in body else stored.get("master")
        if "master_key" in body:
            self._check_cross_signing_key(master, user_id, "master")
        if not master:
            raise bad_request("No master key available", MISSING_PARAM)
        try:
            _public_key(master)
        except ValueError:
            raise bad_request("Invalid master key", INVALID_PARAM) from None
        for field in ("self_signing_key", "user_signing_key"):
            if field in body:
                self._check_cross_signing_key(body[field], user_id, CROSS_SIGNING_TYPES[field])
        devices_changed = False
        for field, kind in CROSS_SIGNING_TYPES.items():
            if field in body:
                self.keys.set_cross_signing_key(user_id, kind, body[field])
                devices_changed = devices_changed or kind != "user_signing"
        if "user_signing_key" in body:
            self.devices.notify_device_update(user_id, audience=user_id)
        if devices_changed:
            self.devices.notify_device_update(user_id)
        return {}

    @staticmethod
    def _check_cross_signing_key(key: Any, user_id: str, kind: str) -> None:
        if (
            not isinstance(key, dict)
            or key.get("user_id") != user_id
            or kind not in (key.get("usage") or [])
            or not isinstance(key.get("keys"), dict)
            or len(key["keys"]) != 1
        ):
            raise bad_request(f"Invalid {kind} key", INVALID_PARAM)

    # --- /keys/signatures/upload ----------------------------------------------------------

    def upload_signatures(self, user_id: str, body: dict[str, Any]) -> dict[str, Any]:
        failures: dict[str, dict[str, Any]] = {}
        own = body.get(user_id, {})
        others = {k: v for k, v in body.items() if k != user_id}
        stored: list[tuple[str, str, str, str]] = []
        own_signed = self._own_signatures(user_id, own, stored, failures)
        others_signed = self._other_signatures(user_id, others, stored, failures)
        self.keys.add_cross_signing_signatures(user_id, stored)
        if own_signed:
            self.devices.notify_device_update(user_id)
        for target in others_signed:
            self.devices.notify_device_update(target, audience=user_id)
        return {"failures": failures}

    def _own_signatures(
        self,
        user_id: str,
        signed: Any,
        stored: list[tuple[str, str, str, str]],
        failures: dict[str, dict[str, Any]],
    ) -> bool:
        """Signatures of one's devices by one's self-signing key, and of one's master key by
        one's devices."""
        if not signed:
            return False
        if not isinstance(signed, dict):
            raise bad_request("Invalid parameter", INVALID_PARAM)
        try:
            self_signing_id, _ = self._verify_key(user_id, "self_signing")
            master = self.cross_signing_key(user_id, "master")
            _, master_public = self._verify_key(user_id, "master")
            devices = self.keys.get_device_keys([(user_id, None)]).get(user_id)
            if not devices:
                raise not_found("No device keys found")
        except MatrixError as error:
            failures[user_id] = dict.fromkeys(signed, _failure(error))
            return False
        changed = False
        for device_id, device in signed.items():
            if not isinstance(device, dict):
                raise bad_request("Invalid parameter", INVALID_PARAM)
            try:
                signatures = device.get("signatures")
                if not isinstance(signatures, dict) or not isinstance(
                    signatures.get(user_id), dict
                ):
                    raise bad_request("Invalid signature", INVALID_SIGNATURE)
                if device_id == master_public:
                    assert master is not None
                    if _strip(device) != _strip(master):
                        raise bad_request("Key does not match")
                    for key_id, signature in signatures[user_id].items():
                        algorithm, signing_device = key_id.split(":", 1)
                        if algorithm == "ed25519" and (
                            signing_device not in devices
                            or key_id not in devices[signing_device][0].get("keys", {})
                        ):
                            raise bad_request("Invalid signature", INVALID_SIGNATURE)
                        stored.append((key_id, user_id, device_id, signature))
                    continue
                if self_signing_id not in signatures[user_id]:
                    raise bad_request("Invalid signature", INVALID_SIGNATURE)
                if device_id not in devices:
                    raise not_found("Unknown device")
                stored_keys = self._device_with_signatures(user_id, device_id, *devices[device_id])
                if self_signing_id in stored_keys.get("signatures", {}).get(user_id, {}):
                    continue  # already signed: the same signature again
                if _strip(device) != _strip(stored_keys):
                    raise bad_request("Key does not match")
                stored.append(
                    (self_signing_id, user_id, device_id, signatures[user_id][self_signing_id])
                )
                changed = True
            except MatrixError as error:
                failures.setdefault(user_id, {})[device_id] = _failure(error)
        return changed

    def _other_signatures(
        self,
        user_id: str,
        signed: dict[str, Any],
        stored: list[tuple[str, str, str, str]],
        failures: dict[str, dict[str, Any]],
    ) -> list[str]:
        """Signatures of other users' master keys by one's user-signing key."""
        if not signed:
            return []
        try:
            user_signing_id, _ = self._verify_key(user_id, "user_signing")
        except MatrixError as error:
            for target, devices in signed.items():
                failures[target] = dict.fromkeys(devices, _failure(error))
            return []
        targets = []
        for target, devices in signed.items():
            if not isinstance(devices, dict) or not all(
                isinstance(d, dict) for d in devices.values()
            ):
                raise bad_request("Invalid parameter", INVALID_PARAM)
            master_public: str | None = None
            try:
                master = self.cross_signing_key(target, "master", user_id)
                if master is None:
                    raise not_found(f"No master key found for {target}")
                _, public = _public_key(master)
                if public not in devices:
                    raise not_found("Unknown device")
                master_public = public
                extra = [d for d in devices if d != public]
                if extra:
                    failures[target] = dict.fromkeys(extra, _failure(not_found("Unknown device")))
                if user_signing_id in master.get("signatures", {}).get(user_id, {}):
                    continue
                key = devices[public]
                if _strip(key) != _strip(master):
                    raise bad_request("Key does not match")
                signature = key.get("signatures", {}).get(user_id, {}).get(user_signing_id)
                if not isinstance(signature, str):
                    raise bad_request("Invalid signature", INVALID_SIGNATURE)
                stored.append((user_signing_id, target, public, signature))
                targets.append(target)
            except MatrixError as error:
                if master_public is None:
                    failures[target] = dict.fromkeys(devices, _failure(error))
                else:
                    failures.setdefault(target, {})[master_public] = _failure(error)
        return targets

    def _verify_key(self, user_id: str, kind: str) -> tuple[str, str]:
        key = self.keys.get_cross_signing_keys(user_id).get(kind)
        if key is None:
            raise not_found(f"No {kind} key found for {user_id}")
        try:
            return _public_key(key)
        except ValueError:
            raise bad_request(f"Invalid {kind} key") from None

    # --- /sync's counts -------------------------------------------------------------------

    def one_time_key_counts(self, user_id: str, device_id: str) -> dict[str, int]:
        return self.keys.count_one_time_keys(user_id, device_id)

    def unused_fallback_key_types(self, user_id: str, device_id: str) -> list[str]:
        return self.keys.unused_fallback_key_types(user_id, device_id)
