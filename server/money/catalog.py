"""The gift catalog, coin packages and economics, loaded from TOML and validated once at start."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from giftstream.protocol.rules import ID_RULE, is_id

MAX_COINS = 10**9  # a single gift or package above a billion coins is a typo, not a price


class CatalogError(ValueError):
    """The catalog file is missing, unreadable or breaks a rule; the message names what."""


@dataclass(frozen=True, slots=True)
class Gift:
    id: str
    name: str
    coins: int
    animation: str

    def as_wire(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "coins": self.coins, "animation": self.animation}


@dataclass(frozen=True, slots=True)
class Package:
    id: str
    coins: int
    price_cents: int
    currency: str

    def as_wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "coins": self.coins,
            "price_cents": self.price_cents,
            "currency": self.currency,
        }


@dataclass(frozen=True, slots=True)
class Economics:
    """How coins become diamonds and diamonds become cents; all integers."""

    creator_share_bp: int = 5000
    cents_per_100_diamonds: int = 50
    payout_min_diamonds: int = 10000

    def diamonds_for(self, coins: int) -> int:
        return coins * self.creator_share_bp // 10000

    def cents_for(self, diamonds: int) -> int:
        return diamonds * self.cents_per_100_diamonds // 100


@dataclass(frozen=True, slots=True)
class Catalog:
    gifts: dict[str, Gift]
    packages: dict[str, Package]
    economics: Economics

    def as_wire(self) -> dict[str, Any]:
        return {
            "gifts": [g.as_wire() for g in self.gifts.values()],
            "packages": [p.as_wire() for p in self.packages.values()],
        }


def demo_catalog_path() -> Path:
    return Path(str(resources.files("giftstream.server.money").joinpath("demo_catalog.toml")))


def load_catalog(path: str | Path | None = None) -> Catalog:
    """Read and validate a catalog file (the bundled demo one when `path` is None)."""
    file = Path(path) if path is not None else demo_catalog_path()
    try:
        raw = tomllib.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CatalogError(f"catalog {file}: cannot read: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"catalog {file}: not valid TOML: {exc}") from exc
    try:
        return parse_catalog(raw)
    except CatalogError as exc:
        raise CatalogError(f"catalog {file}: {exc}") from exc


def parse_catalog(raw: dict[str, Any]) -> Catalog:
    econ_raw = raw.get("economics", {})
    if not isinstance(econ_raw, dict):
        raise CatalogError("[economics] must be a table")
    currency = econ_raw.get("currency", "USD")
    if not isinstance(currency, str) or not re.fullmatch(r"[A-Z]{3}", currency):
        raise CatalogError("economics.currency must be a 3-letter ISO code such as USD")
    economics = Economics(
        creator_share_bp=_int(econ_raw, "creator_share_bp", "economics", 5000, 0, 10000),
        cents_per_100_diamonds=_int(
            econ_raw, "cents_per_100_diamonds", "economics", 50, 0, 1_000_000
        ),
        payout_min_diamonds=_int(econ_raw, "payout_min_diamonds", "economics", 10000, 1, 10**12),
    )
    gifts: dict[str, Gift] = {}
    for i, g in enumerate(_tables(raw, "gifts")):
        where = f"gifts[{i}]"
        gift = Gift(
            id=_ident(g, where),
            name=_str(g, "name", where),
            coins=_int(g, "coins", where, None, 1, MAX_COINS),
            animation=_str(g, "animation", where),
        )
        if gift.id in gifts:
            raise CatalogError(f"{where}: duplicate gift id {gift.id!r}")
        gifts[gift.id] = gift
    packages: dict[str, Package] = {}
    for i, p in enumerate(_tables(raw, "packages")):
        where = f"packages[{i}]"
        package = Package(
            id=_ident(p, where),
            coins=_int(p, "coins", where, None, 1, MAX_COINS),
            price_cents=_int(p, "price_cents", where, None, 0, 10**9),
            currency=currency,
        )
        if package.id in packages:
            raise CatalogError(f"{where}: duplicate package id {package.id!r}")
        packages[package.id] = package
    if not gifts:
        raise CatalogError("needs at least one [[gifts]] entry")
    if not packages:
        raise CatalogError("needs at least one [[packages]] entry")
    return Catalog(gifts=gifts, packages=packages, economics=economics)


def _tables(raw: dict[str, Any], name: str) -> list[dict[str, Any]]:
    items = raw.get(name, [])
    if not isinstance(items, list) or not all(isinstance(t, dict) for t in items):
        raise CatalogError(f"{name} must be an array of tables ([[{name}]])")
    return items


def _ident(table: dict[str, Any], where: str) -> str:
    value = table.get("id")
    if not is_id(value):
        raise CatalogError(f"{where}.id must be {ID_RULE}")
    return value


def _str(table: dict[str, Any], key: str, where: str) -> str:
    value = table.get(key)
    if not isinstance(value, str) or not value.strip() or len(value) > 128:
        raise CatalogError(f"{where}.{key} must be a non-empty string of at most 128 characters")
    return value


def _int(
    table: dict[str, Any], key: str, where: str, default: int | None, low: int, high: int
) -> int:
    value = table.get(key, default)
    if value is None:
        raise CatalogError(f"{where}.{key} is required")
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise CatalogError(f"{where}.{key} must be an integer from {low} to {high}")
    return value
