"""Key agreement, share encryption and mask expansion against published test vectors and their bindings."""

import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedtune.secagg import crypto, prg
from fedtune.secagg.errors import ProtocolViolation

# RFC 7748, section 6.1 (X25519 Diffie-Hellman).
ALICE_PRIVATE = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
ALICE_PUBLIC = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
BOB_PRIVATE = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
BOB_PUBLIC = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
SHARED = bytes.fromhex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")


def test_x25519_rfc7748_vectors():
    alice, bob = (
        crypto.KeyPair.from_private_bytes(ALICE_PRIVATE),
        crypto.KeyPair.from_private_bytes(BOB_PRIVATE),
    )
    assert alice.public == ALICE_PUBLIC and bob.public == BOB_PUBLIC
    assert alice.private_bytes() == ALICE_PRIVATE


def test_agreement_is_hkdf_of_the_rfc_secret_bound_to_purpose_round_and_ids():
    alice, bob = (
        crypto.KeyPair.from_private_bytes(ALICE_PRIVATE),
        crypto.KeyPair.from_private_bytes(BOB_PRIVATE),
    )
    key = crypto.agree(alice.private, BOB_PUBLIC, purpose=crypto.PURPOSE_MASK, round_id=7, a=3, b=5)
    info = (
        b"fedtune/secagg/v1/pairwise-mask/"
        + (7).to_bytes(8, "big")
        + (3).to_bytes(4, "big")
        + (5).to_bytes(4, "big")
    )
    assert key == HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(SHARED)
    assert key.hex() == "401be1fb2037bffa3f523056c05799b43c5c8fce452d5956445526649c606ccd"
    # the other side derives the same key, ids in either order
    assert crypto.agree(bob.private, ALICE_PUBLIC, purpose=crypto.PURPOSE_MASK, round_id=7, a=5, b=3) == key
    others = {
        crypto.agree(alice.private, BOB_PUBLIC, purpose=crypto.PURPOSE_SHARES, round_id=7, a=3, b=5),
        crypto.agree(alice.private, BOB_PUBLIC, purpose=crypto.PURPOSE_MASK, round_id=8, a=3, b=5),
        crypto.agree(alice.private, BOB_PUBLIC, purpose=crypto.PURPOSE_MASK, round_id=7, a=3, b=6),
    }
    assert key not in others and len(others) == 3


def test_low_order_public_key_is_refused():
    alice = crypto.KeyPair.from_private_bytes(ALICE_PRIVATE)
    with pytest.raises(ProtocolViolation, match="unusable public key"):
        crypto.agree(alice.private, bytes(32), purpose=crypto.PURPOSE_MASK, round_id=0, a=0, b=1)


def test_sealed_share_format_and_bindings():
    key, nonce, plain = bytes(range(32)), bytes(12), b"shares"
    sealed = crypto.seal(key, plain, round_id=1, sender=2, receiver=3, nonce=nonce)
    ad = (
        b"fedtune/secagg/v1/share/" + (1).to_bytes(8, "big") + (2).to_bytes(4, "big") + (3).to_bytes(4, "big")
    )
    assert sealed == nonce + AESGCM(key).encrypt(nonce, plain, ad)
    assert crypto.open_sealed(key, sealed, round_id=1, sender=2, receiver=3) == plain
    for round_id, sender, receiver in [(2, 2, 3), (1, 4, 3), (1, 3, 2)]:  # other round, sender, direction
        with pytest.raises(ProtocolViolation, match="fails authentication"):
            crypto.open_sealed(key, sealed, round_id=round_id, sender=sender, receiver=receiver)
    tampered = bytearray(sealed)
    tampered[20] ^= 1
    with pytest.raises(ProtocolViolation, match="tampered"):
        crypto.open_sealed(key, bytes(tampered), round_id=1, sender=2, receiver=3)


def test_aes256_ctr_keystream_nist_sp800_38a_f55():
    key = bytes.fromhex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4")
    counter = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")
    plain = bytes.fromhex(
        "6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51"
        "30c81c46a35ce411e5fbc1191a0a52eff69f2445df4f9b17ad2b417be66c3710"
    )
    cipher = bytes.fromhex(
        "601ec313775789a5b7a7f504bbf3d228f443e3ca4d62b59aca84e990cacaf5c5"
        "2b0930daa23de94ce87017ba2d84988ddfc9c58db67aada613c2dd08457941a6"
    )
    stream = prg.keystream(key, 64, initial_counter=counter)
    assert bytes(p ^ s for p, s in zip(plain, stream, strict=True)) == cipher


def test_mask_is_the_aes_of_the_counter_read_as_little_endian_words():
    seed = bytes(range(32))
    words = prg.expand(seed, 10)  # 40 bytes: three counter blocks, the last one cut
    blocks = b"".join(i.to_bytes(16, "big") for i in range(3))
    ecb = Cipher(algorithms.AES(seed), modes.ECB()).encryptor().update(blocks)
    assert words.dtype == np.dtype("<u4")
    assert words.tolist() == [int.from_bytes(ecb[4 * i : 4 * i + 4], "little") for i in range(10)]


def test_long_mask_is_the_keystream_across_chunks():
    seed = bytes([7] * 32)
    words = 70_001  # more than one 64 Ki-word chunk, the last one partial
    assert np.array_equal(prg.expand(seed, words), np.frombuffer(prg.keystream(seed, 4 * words), "<u4"))


def test_masks_add_and_cancel_mod_2_32():
    acc = np.array([0, 1, 2**32 - 1], dtype=prg.WORD)
    a, b = bytes(32), bytes([1] * 32)
    prg.apply_masks(acc, add=[a, b])
    expected = (np.array([0, 1, 2**32 - 1], dtype=np.uint64) + prg.expand(a, 3) + prg.expand(b, 3)) % 2**32
    assert acc.tolist() == expected.tolist()
    prg.apply_masks(acc, subtract=[b, a])
    assert acc.tolist() == [0, 1, 2**32 - 1]
    with pytest.raises(ValueError, match="seed"):
        prg.expand(bytes(16), 4)
