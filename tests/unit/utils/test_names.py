"""safe_filename: safe ids unchanged, every other id one portable, collision-free path component."""
from __future__ import annotations

import random
import string

import pytest

from medtrust.utils.names import MAX_LENGTH, is_safe_filename, safe_filename


def portable(name: str) -> bool:
    return (0 < len(name) <= MAX_LENGTH and name not in (".", "..") and not name.startswith((".", "-"))
            and not name.endswith((".", " ")) and all(c.isascii() and (c.isalnum() or c in "._-~") for c in name))


@pytest.mark.parametrize("rid", ["ISIC_0000000", "train_17", "derm_00003", "x.png", "00000001_000.png",
                                 "CheXpert-v1.0-small", "_hidden_not", "a" * MAX_LENGTH])
def test_safe_ids_are_returned_unchanged(rid):
    assert safe_filename(rid) == rid


@pytest.mark.parametrize("rid,start", [
    ("images/a/x.png", "images_a_x.png~"), ("a\\x.png", "a_x.png~"), ("..", "_~"), (".", "_~"), ("", "_~"),
    ("../../etc/passwd", "etc_passwd~"), (".bashrc", "bashrc~"), ("-rf", "rf~"), ("x.", "x~"),
    ("CON", "_CON~"), ("con.png", "_con.png~"), ("lpt1.txt", "_lpt1.txt~"), ("a\x00b\nc", "a_b_c~"),
    ("naïve résumé.png", "na_ve_r_sum_.png~"), ("a" * (MAX_LENGTH + 1), "a" * 107 + "~"),
])
def test_unsafe_ids_get_a_slug_and_hash(rid, start):
    name = safe_filename(rid)
    assert name.startswith(start) and len(name) == len(start) + 12 and portable(name) and not is_safe_filename(name)
    assert safe_filename(rid) == name  # stable


def test_slug_collisions_are_told_apart_by_the_hash():
    ids = ["a/x.png", "a_x.png", "a\\x.png", "a x.png", "a//x.png", "a/x.png ", "A/x.png"]
    assert len({safe_filename(i) for i in ids}) == len(ids)
    assert safe_filename("a_x.png") == "a_x.png"


def test_random_ids_are_portable_and_injective():
    # hypothesis is not installed; a seeded random sample over a hostile alphabet does the same job
    rng = random.Random(0)
    alphabet = string.ascii_letters[:6] + string.digits[:3] + "._-/\\ ~:*?\"<>|\x00\x1f\x7féß€"
    ids = {"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 200))) for _ in range(5000)}
    ids |= {"".join(rng.choice("ab./") for _ in range(rng.randint(0, 6))) for _ in range(2000)}
    names = {}
    for rid in ids:
        name = safe_filename(rid)
        assert portable(name), (rid, name)
        assert names.setdefault(name, rid) == rid, f"{rid!r} and {names[name]!r} both map to {name!r}"


def test_non_string_id_is_refused():
    with pytest.raises(TypeError, match="record id must be a str, got int"):
        safe_filename(17)
