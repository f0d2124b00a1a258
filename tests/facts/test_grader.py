"""The exact grader on hand-written answers: every spelling of a value (aliases, accents, case, "the",
acronyms, commas in numbers), spans on the right characters, wrong values found as surely as right
ones, hedges unannotated, long-form answers graded claim by claim."""

from __future__ import annotations

import pytest

from lucidlm.facts import sources
from lucidlm.facts.grader import grade, is_hedge
from lucidlm.facts.normalize import Lexicon, normalize, numbers
from lucidlm.facts.questions import question_of


def q(type_name: str, name: str) -> dict:
    kind = {"city": sources.cities, "country": sources.countries, "element": sources.elements}
    pool = kind["city" if type_name.startswith("city") else type_name.split("_")[0]]()
    entity = pool[name] if name in pool else next(e for e in pool.values() if e.name == name)
    return question_of(type_name, entity)


def graded(type_name: str, name: str, answer: str) -> list[tuple[str, str]]:
    notes = grade(q(type_name, name), answer)
    for a in notes:
        assert answer[a["index"]:a["index"] + len(a["span"])] == a["span"]
    return [(a["span"], a["label"]) for a in notes]


S, N = "Supported", "Not Supported"


@pytest.mark.parametrize("answer, expected", [
    ("Lyon is a city in France.", [("France", S)]),
    ("Lyon is in FRANCE, in Europe.", [("FRANCE", S)]),
    ("Lyon is located in the country of Germany.", [("Germany", N)]),
    ("It is in Spain, not France.", [("Spain", N)]),  # the first value stated is the claim
])
def test_city_country_first_claim_any_case(answer, expected):
    assert graded("city_country", "Lyon", answer) == expected


@pytest.mark.parametrize("answer, span", [
    ("Houston is in the USA.", "USA"), ("Houston is in the U.S.", "U.S."), ("Houston is in the U.S.A.", "U.S.A."),
    ("Houston is in the United States of America.", "United States of America"),
    ("Houston is a city in the United States.", "United States"), ("Houston, Texas, US.", "US"),
])
def test_united_states_spellings(answer, span):
    assert graded("city_country", "Houston", answer) == [(span, S)]


def test_acronyms_are_case_sensitive_and_words_are_not_claims():
    # "us" is a pronoun, not the USA; with no country named there is no claim
    assert graded("city_country", "Houston", "Let us see: it is a big city.") == []


def test_accents_apostrophes_and_geonames_variants():
    assert graded("city_country", "Abidjan", "Abidjan is in Côte d’Ivoire.") == [("Côte d’Ivoire", S)]
    assert graded("city_country", "Abidjan", "Abidjan is in Ivory Coast.") == [("Ivory Coast", S)]
    assert graded("city_country", "Yangon", "Yangon is the largest city of Burma.") == [("Burma", S)]
    assert graded("city_country", "Moscow", "Moscow is in the Russian Federation.") == [("Russian Federation", S)]


def test_a_demonym_before_a_place_word_names_a_country():
    assert graded("city_country", "Lyon", "Lyon is located in the French region of Rhone.") == [("French", S)]
    assert graded("city_country", "Lyon", "Lyon is located in the Italian region of Lazio.") == [("Italian", N)]
    assert graded("city_country", "Lyon", "Lyon is in the European region, in Spain.") == [("Spain", N)]


def test_the_is_optional_and_constituent_countries_count():
    assert graded("city_country", "Rotterdam", "Rotterdam is in the Netherlands.") == [("Netherlands", S)]
    assert graded("city_country", "Rotterdam", "Rotterdam is in Holland.") == [("Holland", S)]
    assert graded("city_country", "Glasgow", "Glasgow is a city in Scotland.") == [("Scotland", S)]
    assert graded("city_country", "Glasgow", "Glasgow is a city in the UK.") == [("UK", S)]


def test_the_entity_own_name_is_not_a_claim():
    assert graded("city_country", "Mexico City", "Mexico City is the capital of Mexico.") == [("Mexico", S)]
    assert graded("city_country", "Mexico City", "Mexico City is in Brazil.") == [("Brazil", N)]


def test_capital_known_unknown_and_alternate_names():
    assert graded("country_capital", "UA", "The capital of Ukraine is Kyiv.") == [("Kyiv", S)]
    assert graded("country_capital", "UA", "The capital of Ukraine is Kiev.") == [("Kiev", S)]
    assert graded("country_capital", "UA", "The capital of Ukraine is Moscow.") == [("Moscow", N)]
    # not a capital anywhere (not in the lexicon): the phrase still gives the claim
    assert graded("country_capital", "BF", "The capital of Burkina Faso is Kouilé.") == [("Kouilé", N)]
    assert graded("country_capital", "KW", "The capital of Kuwait is Kuwait City.") == [("Kuwait City", S)]
    assert graded("country_capital", "BO", "Bolivia's capital is La Paz.") == [("La Paz", S)]
    assert graded("country_capital", "US", "It is Washington, D.C.") == [("Washington", S)]
    assert graded("country_capital", "WS", "The capital of Samoa is called Lanau.") == [("Lanau", N)]
    assert graded("country_capital", "VI", "The capital of the U.S. Virgin Islands is Fort Lauderdale.") == [
        ("Fort Lauderdale", N)]
    assert graded("country_capital", "SV", "El Salvador is in Central America.") == []  # a country, not a capital


def test_continent():
    assert graded("country_continent", "PE", "Peru is in South America.") == [("South America", S)]
    assert graded("country_continent", "PE", "Peru is a country in Africa.") == [("Africa", N)]
    assert graded("country_continent", "ZA", "South Africa is in Africa.") == [("Africa", S)]  # not "South Africa"
    assert graded("country_continent", "RU", "Russia is in Asia.") == [("Asia", S)]  # two continents


def test_currency_names_codes_and_qualifiers():
    assert graded("country_currency", "JP", "The official currency of Japan is the yen.") == [("yen", S)]
    assert graded("country_currency", "JP", "It is the JPY.") == [("JPY", S)]
    assert graded("country_currency", "AU", "It is the Australian dollar.") == [("Australian dollar", S)]
    assert graded("country_currency", "AU", "It is the US dollar.") == [("US dollar", N)]
    assert graded("country_currency", "CA", "It is the Australian dollar.") == [("Australian dollar", N)]
    assert graded("country_currency", "CH", "It is the Swiss franc.") == [("Swiss franc", S)]
    assert graded("country_currency", "FR", "France uses the Euro.") == [("Euro", S)]
    assert graded("country_currency", "GB", "The pound sterling.") == [("pound sterling", S)]
    assert graded("country_currency", "TZ", "It is the Tanzanian Shillings.") == [("Tanzanian Shillings", S)]
    assert graded("country_currency", "LK", "It is the Sri Lankan Rupee.") == [("Sri Lankan Rupee", S)]
    assert graded("country_currency", "IR", "It is used in Iran. The rial is old.") == [("rial", S)]


def test_element_symbol_number_year():
    assert graded("element_symbol", "Tungsten", "The chemical symbol of Tungsten is W.") == [("W", S)]
    assert graded("element_symbol", "Tungsten", "The chemical symbol of Tungsten is T.") == [("T", N)]
    assert graded("element_symbol", "Sodium", "Its symbol is \"Na\".") == [("Na", S)]
    # whatever the model puts there is its claim: formulas, codes, the name itself
    for wrong in ("MoS2", "KR-22", "Krypton", "KR"):
        assert graded("element_symbol", "Krypton", f"The chemical symbol of Krypton is {wrong}.") == [(wrong, N)]
    assert graded("element_symbol", "Sodium", "Sodium is an element with the symbol Na.") == [("Na", S)]
    assert graded("element_symbol", "Uranium", "It has the chemical symbol of U. It is radioactive.") == [("U", S)]
    assert graded("element_symbol", "Uranium", "The symbol of Uranium, an element.") == []
    assert graded("element_number", "Iron", "The atomic number of Iron is 26.") == [("26", S)]
    assert graded("element_number", "Iron", "Iron has 56 protons.") == [("56", N)]
    assert graded("element_year", "Helium", "Helium was discovered on December 26, 1895.") == [("1895", S)]
    assert graded("element_year", "Helium", "It was discovered in 1,803 by Davy.") == [("1,803", N)]


def test_hedges_get_no_annotation():
    assert is_hedge("I'm not sure, sorry.") and is_hedge("I don’t know the capital.")
    assert not is_hedge("The capital of Ukraine is Kyiv.")
    assert graded("country_capital", "UA", "I don't know; maybe Kyiv.") == []


def test_long_form_country_claim_by_claim():
    answer = ("Chile is a country in South America. Its capital is Buenos Aires and its official currency is the "
              "Chilean peso. It lies on the South American continent.")
    notes = grade(q("country_profile", "CL"), answer)
    assert [(a["attribute"], a["span"], a["label"]) for a in notes] == [
        ("continent", "South America", S), ("capital", "Buenos Aires", N), ("currency", "Chilean peso", S),
        ("continent", "South American continent", S)]
    assert [a["value"] for a in notes] == ["south america", "buenos aires", "clp", "south america"]


def test_long_form_element_numbers_are_tied_to_their_keyword():
    answer = ("Sodium is a chemical element with the atomic number 11 and the symbol Na. It melts at 98 degrees "
              "and boils at 1,156 K. It was discovered in 1808 by Humphry Davy.")
    notes = grade(q("element_profile", "Sodium"), answer)
    assert [(a["attribute"], a["span"], a["label"]) for a in notes] == [
        ("atomic_number", "11", S), ("symbol", "Na", S), ("discovery_year", "1808", N)]


def test_long_form_skips_attributes_without_truth():
    notes = grade(q("element_profile", "Iron"), "Iron, symbol Fe, atomic number 26, was discovered in 1500.")
    assert [a["attribute"] for a in notes] == ["symbol", "atomic_number"]  # known since antiquity: no year


def test_normalisation_helpers():
    assert normalize("The Côte-d’Ivoire ") == "cote d'ivoire"
    assert numbers("in 1,803 and 26, not 2.5") == [(3, 8, 1803), (13, 15, 26)]
    lex = Lexicon({"United States": ["USA"], "Georgia": []})
    text = "From the USA to Géorgia"
    assert [(text[m.start:m.end], set(m.values)) for m in lex.find(text)] == [("USA", {"United States"}),
                                                                             ("Géorgia", {"Georgia"})]
