"""Where an answer states a value for an attribute: one finder per attribute, each returning claims with the
exact characters they occupy and the canonical values the words may stand for.

Named values (countries, capitals, continents, currencies) are found with a ``Lexicon`` of every value
the attribute can take, so a wrong answer is found as surely as a right one; capitals the lexicon lacks
("The capital of Burkina Faso is Kouilé") are caught by the phrase around them. Symbols and numbers
are read next to their keyword ("symbol Na", "atomic number 11", "discovered in 1807"). ``anchored``
(long-form answers) keeps only values tied to their keyword: a long answer mentions many numbers and
places, and only those are claims about the attribute; a one-claim answer falls back to its first value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

from . import sources
from .normalize import Lexicon, Mention, normalize, numbers


@dataclass(frozen=True)
class Claim:
    attribute: str
    start: int
    end: int
    values: frozenset[str]  # canonical values the claim may mean (e.g. a bare "dollar": every dollar)
    value: str  # normalised claimed value, for reports and value-disjoint splits


@cache
def country_lexicon() -> Lexicon:
    return Lexicon({names[0]: names[1:] for names in sources.all_country_names().values()})


@cache
def capital_lexicon() -> Lexicon:
    values: dict[str, set[str]] = {}
    for iso, country in sources.countries(0).items():
        values.setdefault(country.attributes["capital"], set()).update(sources.capital_aliases(iso))
        for extra in sources.EXTRA_CAPITALS.get(iso, ()):
            values.setdefault(extra, set())
    return Lexicon(values)


@cache
def continent_lexicon() -> Lexicon:
    return Lexicon({c.name: c.aliases for c in sources.continents().values()})


@cache
def currency_lexicon() -> Lexicon:
    # plurals too ("Tanzanian shillings"); the code as an acronym
    return Lexicon({code: (*names, *(n + "s" for n in names), code) for code, names in sources.currencies().items()})


def outside(mentions: list[Mention], masks: list[Mention]) -> list[Mention]:
    """Mentions not inside a mention of the entity asked about ("Mexico" inside "Mexico City")."""
    return [m for m in mentions if not any(k.start <= m.start and m.end <= k.end for k in masks)]


def _named(attribute: str, answer: str, lexicon: Lexicon, masks: list[Mention], start: int = 0) -> list[Claim]:
    out = []
    for m in outside(lexicon.find(answer), masks):
        if m.start >= start:
            out.append(Claim(attribute, m.start, m.end, m.values, _value(m.values, answer[m.start:m.end])))
    return out


def _value(values: frozenset[str], text: str) -> str:
    return normalize(next(iter(values))) if len(values) == 1 else normalize(text)


# "the Indian state of Gujarat", "the Italian region of Lazio": a demonym before a place word names a country
_DEMONYM_PLACE = re.compile(r"\b([A-Z][a-z]+) (?:region|state|province|city|town|part|island|county|district|"
                            r"territory|department|prefecture|coast|subcontinent|municipality)\b")


def country_claims(answer: str, masks: list[Mention], anchored: bool) -> list[Claim]:
    out = _named("country", answer, country_lexicon(), masks)
    for m in _DEMONYM_PLACE.finditer(answer):
        if any(k.start <= m.start(1) < k.end for k in masks):
            continue
        names = {sources.all_country_names()[iso][0] for iso in qualifier_countries(m.group(1))}
        if names:
            out.append(Claim("country", m.start(1), m.end(1), frozenset(names), _value(frozenset(names), m.group(1))))
    return sorted(out, key=lambda c: c.start)


def continent_claims(answer: str, masks: list[Mention], anchored: bool) -> list[Claim]:
    return _named("continent", answer, continent_lexicon(), masks)


_CAPITAL_IS = re.compile(r"capital(?: city)?(?: of [^,;\n]{1,60}?)?(?: is|:| was)\s+(?:called\s+|known as\s+|named\s+)?"
                         r"(?:the city of\s+)?"
                         r"([A-Z][\w'’.\-]*(?:\s+(?:[A-Z][\w'’\-]*|de|da|do|del|la|el|es|al))*)")


def capital_claims(answer: str, masks: list[Mention], anchored: bool) -> list[Claim]:
    """Capitals named after the word "capital" (any capital of the lexicon, or a name the phrase gives);
    a one-claim answer without the phrase: the first capital it names. Names inside a country's name are not
    capitals ("Salvador" in "El Salvador")."""
    masks = masks + country_lexicon().find(answer)
    out: list[Claim] = []
    for m in re.finditer(r"\bcapital\b", answer, flags=re.I):
        sentence_end = _sentence_end(answer, m.end())
        known = [c for c in _named("capital", answer, capital_lexicon(), masks, m.end()) if c.start < sentence_end]
        if known:
            out.append(known[0])
            continue
        phrase = _CAPITAL_IS.match(answer, m.start())
        if phrase:
            name = phrase.group(1).rstrip(".")
            out.append(Claim("capital", phrase.start(1), phrase.start(1) + len(name), frozenset(), normalize(name)))
    if not out and not anchored:
        out = _named("capital", answer, capital_lexicon(), masks)[:1]
    return _unique(out)


def _sentence_end(text: str, at: int) -> int:
    m = re.compile(r"[.!?](?:\s|$)|\n").search(text, at)
    return m.start() if m else len(text)


def _sentence_start(text: str, at: int) -> int:
    cut = max(text.rfind(". ", 0, at), text.rfind("\n", 0, at), text.rfind("! ", 0, at), text.rfind("? ", 0, at))
    return cut + 1 if cut >= 0 else 0


def _unique(claims: list[Claim]) -> list[Claim]:
    seen, out = set(), []
    for c in claims:
        if (c.start, c.end) not in seen:
            seen.add((c.start, c.end))
            out.append(c)
    return out


# Demonyms that do not start like their country's name ("Swiss" franc): ISO codes.
IRREGULAR_DEMONYMS = {"swiss": "CH", "british": "GB", "dutch": "NL", "american": "US", "us": "US", "u.s.": "US",
                      "uk": "GB", "czech": "CZ", "danish": "DK", "swedish": "SE", "norwegian": "NO", "thai": "TH",
                      "polish": "PL", "turkish": "TR", "welsh": "GB", "scottish": "GB", "filipino": "PH",
                      "philippine": "PH", "emirati": "AE", "hong kong": "HK", "new zealand": "NZ",
                      "french": "FR", "spanish": "ES", "english": "GB", "irish": "IE", "greek": "GR", "finnish": "FI",
                      "icelandic": "IS", "flemish": "BE", "basque": "ES", "catalan": "ES", "bavarian": "DE"}


def qualifier_countries(word: str) -> set[str]:
    """ISO codes a currency qualifier may name: "Australian" -> {AU} (4-letter prefix of a name), "Swiss" -> {CH}."""
    key = normalize(word)
    if key in IRREGULAR_DEMONYMS:
        return {IRREGULAR_DEMONYMS[key]}
    if len(key) < 4:
        return set()
    return {iso for iso, names in sources.all_country_names().items()
            if any(normalize(n)[:4] == key[:4] and not normalize(n).startswith(("north", "south", "new ", "saint"))
                   for n in names)}


# one or two capitalised words ("Sri Lankan") or a dotted acronym ("U.S.") right before the currency's name
_QUALIFIER = re.compile(r"((?:(?:[A-Z][a-z]+|[A-Z](?:\.[A-Z])+\.?|[A-Z]{2,3})\s){1,2})$")


def currency_claims(answer: str, masks: list[Mention], anchored: bool) -> list[Claim]:
    """Currencies by name or code; a name's qualifier ("Australian dollar") narrows it to that country's."""
    out = []
    for m in outside(currency_lexicon().find(answer), masks):
        start, values = m.start, set(m.values)
        q = _QUALIFIER.search(answer[max(0, m.start - 30):m.start])
        if q and len(m.values) > 1:
            words = q.group(1).split()
            for n in (2, 1):  # "South African" before "African"
                isos = qualifier_countries(" ".join(words[-n:])) if len(words) >= n else set()
                if isos:
                    used = {code for code in values if set(sources.currency_countries().get(code, ())) & isos}
                    values = used or {"?" + normalize(" ".join(words[-n:]))}  # a country without that currency
                    start = m.start - len(" ".join(words[-n:])) - 1
                    break
        out.append(Claim("currency", start, m.end, frozenset(values), _value(frozenset(values), answer[start:m.end])))
    return out


# the token after "symbol ... is" whatever it is ("Na", "MoS2", "KR-22", "Zirconium"): a wrong symbol is a claim too
_SYMBOL = re.compile(r"\bsymbol\b[^.\n]{0,40}?(?:\bis|:|\bas)\s+(?:the\s+(?:letters?\s+)?)?[\"'“(]?"
                     r"([A-Za-z0-9][\w\-]*)|\bsymbol\s+[\"'“(]?([A-Z][\w\-]*)|\bsymbol\s+of\s+[\"'“(]?([A-Z][\w\-]*)")


def symbol_claims(answer: str, masks: list[Mention], anchored: bool) -> list[Claim]:
    out = []
    for m in _SYMBOL.finditer(answer):
        g = next(i for i in (1, 2, 3) if m.group(i))
        if g == 3 and any(k.start <= m.start(g) < k.end for k in masks):
            continue  # "symbol of Sodium, ...": the element's name, not a symbol
        out.append(Claim("symbol", m.start(g), m.end(g), frozenset([m.group(g)]), m.group(g)))
    if not out and not anchored:
        m = re.search(r"\(([A-Z][a-z]?)\)", answer)
        if m:
            out.append(Claim("symbol", m.start(1), m.end(1), frozenset([m.group(1)]), m.group(1)))
    return out


def _number_claim(attribute: str, start: int, end: int, value: int) -> Claim:
    return Claim(attribute, start, end, frozenset([str(value)]), str(value))


def atomic_number_claims(answer: str, masks: list[Mention], anchored: bool) -> list[Claim]:
    """The first number after "atomic number" in its sentence; a one-claim answer without it: its first number."""
    out = []
    for m in re.finditer(r"\batomic number\b", answer, flags=re.I):
        end = _sentence_end(answer, m.end())
        found = [n for n in numbers(answer) if m.end() <= n[0] < min(end, m.end() + 40)]
        if found:
            out.append(_number_claim("atomic_number", *found[0]))
    if not out and not anchored:
        out = [_number_claim("atomic_number", *n) for n in numbers(answer)[:1]]
    return _unique(out)


def discovery_year_claims(answer: str, masks: list[Mention], anchored: bool) -> list[Claim]:
    """Years (1000-2100) in a sentence about discovery; a one-claim answer: its first year."""
    years = [n for n in numbers(answer) if 1000 <= n[2] <= 2100]
    if not anchored:
        return [_number_claim("discovery_year", *n) for n in years[:1]]
    out = []
    for n in years:
        s, e = _sentence_start(answer, n[0]), _sentence_end(answer, n[0])
        if re.search(r"discover|isolat|identif|first (?:found|produced|synthesi)", answer[s:e], flags=re.I):
            out.append(_number_claim("discovery_year", *n))
            break
    return out


FINDERS = {"country": country_claims, "capital": capital_claims, "continent": continent_claims,
           "currency": currency_claims, "symbol": symbol_claims, "atomic_number": atomic_number_claims,
           "discovery_year": discovery_year_claims}
