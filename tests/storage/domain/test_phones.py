from __future__ import annotations

import os
import uuid

import pytest
from cryptography.exceptions import InvalidTag

from storage.domain.errors import InvalidPhone
from storage.domain.phones import PhoneVault, normalize


@pytest.mark.parametrize(
    ("raw", "country", "expected"),
    [
        ("+1 (201) 555-0123", "US", "+12015550123"),
        ("201-555-0123", "US", "+12015550123"),
        ("(201) 555 0123", "US", "+12015550123"),
        ("020 7946 0018", "GB", "+442079460018"),
        ("+44 20 7946 0018", "US", "+442079460018"),
    ],
)
def test_normalize_to_e164(raw: str, country: str, expected: str) -> None:
    assert normalize(raw, country) == expected


@pytest.mark.parametrize("raw", ["", "hello", "+1 555 555 0100", "12", "+999 1234"])
def test_invalid_numbers_are_refused(raw: str) -> None:
    with pytest.raises(InvalidPhone):
        normalize(raw, "US")


def test_vault_round_trip_and_tenant_binding() -> None:
    vault = PhoneVault(os.urandom(32), os.urandom(32))
    church, other = uuid.uuid4(), uuid.uuid4()
    blob = vault.encrypt(church, "+12015550123")
    assert b"+12015550123" not in blob
    assert vault.decrypt(church, blob) == "+12015550123"
    # Same number, fresh nonce: ciphertexts never repeat.
    assert vault.encrypt(church, "+12015550123") != blob
    # A ciphertext moved to another church does not decrypt.
    with pytest.raises(InvalidTag):
        vault.decrypt(other, blob)


def test_lookup_hash_is_keyed_and_stable() -> None:
    key = os.urandom(32)
    a = PhoneVault(os.urandom(32), key)
    b = PhoneVault(os.urandom(32), key)
    c = PhoneVault(os.urandom(32), os.urandom(32))
    assert a.lookup_hash("+12015550123") == b.lookup_hash("+12015550123")
    assert a.lookup_hash("+12015550123") != c.lookup_hash("+12015550123")
    assert a.lookup_hash("+12015550123") != a.lookup_hash("+12015550124")
