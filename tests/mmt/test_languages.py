import pytest

from mmt import languages as L


def test_codes_round_trip():
    assert L.normalize("deu_Latn") == "de"
    assert L.normalize("DE") == "de"
    assert L.normalize("German") == "de"
    assert L.normalize("zho_Hans") == "zh"
    assert L.to_flores("de") == "deu_Latn"
    assert L.to_flores("arb_Arab") == "arb_Arab"
    assert L.name("fr") == "French"
    assert L.name("swh_Latn") == "Swahili"
    for iso in L.all_languages():
        assert L.normalize(L.to_flores(iso)) == iso


def test_unknown_code_is_named():
    with pytest.raises(ValueError, match="'xx'"):
        L.normalize("xx")


def test_xalma_groups():
    assert len(L.GROUPS) == 8
    assert sum(len(v) for v in L.GROUPS.values()) == 49  # 50 languages with English
    assert L.group_of("de") == 1 and L.group_of("fr") == 4 and L.group_of("ar") == 8
    assert L.group_of("en") is None
    assert L.direction_group("en", "ja") == 6 and L.direction_group("ru", "en") == 3


def test_parse_direction():
    assert L.parse_direction("de-en") == ("de", "en")
    assert L.parse_direction("deu_Latn->eng_Latn") == ("de", "en")
    with pytest.raises(ValueError):
        L.parse_direction("de")
    with pytest.raises(ValueError):
        L.parse_direction("de-de")
