"""The catalog's id rule is the wire's (protocol/rules.py): a file cannot name a gift or a
package that no request could ever ask for."""

from __future__ import annotations

from typing import Any

import pytest

from giftstream.server.money.catalog import CatalogError, parse_catalog


def raw_catalog(gift_id: str = "rose", package_id: str = "coins_70") -> dict[str, Any]:
    return {
        "gifts": [{"id": gift_id, "name": "Rose", "coins": 1, "animation": "anim.rose.v1"}],
        "packages": [{"id": package_id, "coins": 70, "price_cents": 99}],
    }


def test_a_good_catalog_parses() -> None:
    catalog = parse_catalog(raw_catalog())
    assert list(catalog.gifts) == ["rose"]
    assert list(catalog.packages) == ["coins_70"]


@pytest.mark.parametrize("bad_id", ["rose\n", "", "x" * 65, "has space", "rosé", "a/b"])
def test_a_gift_id_off_the_rule_is_refused(bad_id: str) -> None:
    """ "rose\\n" passed the old `^...$` with `.match`: `$` matches before a final newline."""
    with pytest.raises(CatalogError, match=r"gifts\[0\]\.id must be 1-64 characters"):
        parse_catalog(raw_catalog(gift_id=bad_id))


@pytest.mark.parametrize("bad_id", ["coins_70\n", ""])
def test_a_package_id_off_the_rule_is_refused(bad_id: str) -> None:
    with pytest.raises(CatalogError, match=r"packages\[0\]\.id must be 1-64 characters"):
        parse_catalog(raw_catalog(package_id=bad_id))
