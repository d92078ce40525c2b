"""Language codes, names and X-ALMA language groups.

Internally a language is its ISO 639-1 code (``de``); FLORES-200 codes (``deu_Latn``) name files.
Every public function accepts either form and raises :class:`mmt.errors.ConfigError` (a ``ValueError``) naming
the unknown code.
"""

from __future__ import annotations

from mmt.errors import ConfigError

# iso -> (FLORES-200 code, English name as used in prompts)
_TABLE: dict[str, tuple[str, str]] = {
    "af": ("afr_Latn", "Afrikaans"),
    "am": ("amh_Ethi", "Amharic"),
    "ar": ("arb_Arab", "Arabic"),
    "az": ("azj_Latn", "Azerbaijani"),
    "be": ("bel_Cyrl", "Belarusian"),
    "bg": ("bul_Cyrl", "Bulgarian"),
    "bn": ("ben_Beng", "Bengali"),
    "bs": ("bos_Latn", "Bosnian"),
    "ca": ("cat_Latn", "Catalan"),
    "cs": ("ces_Latn", "Czech"),
    "cy": ("cym_Latn", "Welsh"),
    "da": ("dan_Latn", "Danish"),
    "de": ("deu_Latn", "German"),
    "el": ("ell_Grek", "Greek"),
    "en": ("eng_Latn", "English"),
    "eo": ("epo_Latn", "Esperanto"),
    "es": ("spa_Latn", "Spanish"),
    "et": ("est_Latn", "Estonian"),
    "eu": ("eus_Latn", "Basque"),
    "fa": ("pes_Arab", "Persian"),
    "fi": ("fin_Latn", "Finnish"),
    "fr": ("fra_Latn", "French"),
    "ga": ("gle_Latn", "Irish"),
    "gl": ("glg_Latn", "Galician"),
    "gu": ("guj_Gujr", "Gujarati"),
    "ha": ("hau_Latn", "Hausa"),
    "he": ("heb_Hebr", "Hebrew"),
    "hi": ("hin_Deva", "Hindi"),
    "hr": ("hrv_Latn", "Croatian"),
    "hu": ("hun_Latn", "Hungarian"),
    "hy": ("hye_Armn", "Armenian"),
    "id": ("ind_Latn", "Indonesian"),
    "is": ("isl_Latn", "Icelandic"),
    "it": ("ita_Latn", "Italian"),
    "ja": ("jpn_Jpan", "Japanese"),
    "ka": ("kat_Geor", "Georgian"),
    "kk": ("kaz_Cyrl", "Kazakh"),
    "km": ("khm_Khmr", "Khmer"),
    "kn": ("kan_Knda", "Kannada"),
    "ko": ("kor_Hang", "Korean"),
    "ky": ("kir_Cyrl", "Kyrgyz"),
    "lb": ("ltz_Latn", "Luxembourgish"),
    "lo": ("lao_Laoo", "Lao"),
    "lt": ("lit_Latn", "Lithuanian"),
    "lv": ("lvs_Latn", "Latvian"),
    "mg": ("plt_Latn", "Malagasy"),
    "mk": ("mkd_Cyrl", "Macedonian"),
    "ml": ("mal_Mlym", "Malayalam"),
    "mn": ("khk_Cyrl", "Mongolian"),
    "mr": ("mar_Deva", "Marathi"),
    "ms": ("zsm_Latn", "Malay"),
    "mt": ("mlt_Latn", "Maltese"),
    "my": ("mya_Mymr", "Burmese"),
    "ne": ("npi_Deva", "Nepali"),
    "nl": ("nld_Latn", "Dutch"),
    "no": ("nob_Latn", "Norwegian"),
    "pa": ("pan_Guru", "Punjabi"),
    "pl": ("pol_Latn", "Polish"),
    "ps": ("pbt_Arab", "Pashto"),
    "pt": ("por_Latn", "Portuguese"),
    "ro": ("ron_Latn", "Romanian"),
    "ru": ("rus_Cyrl", "Russian"),
    "si": ("sin_Sinh", "Sinhala"),
    "sk": ("slk_Latn", "Slovak"),
    "sl": ("slv_Latn", "Slovenian"),
    "so": ("som_Latn", "Somali"),
    "sq": ("als_Latn", "Albanian"),
    "sr": ("srp_Cyrl", "Serbian"),
    "sv": ("swe_Latn", "Swedish"),
    "sw": ("swh_Latn", "Swahili"),
    "ta": ("tam_Taml", "Tamil"),
    "te": ("tel_Telu", "Telugu"),
    "tg": ("tgk_Cyrl", "Tajik"),
    "th": ("tha_Thai", "Thai"),
    "tl": ("tgl_Latn", "Tagalog"),
    "tr": ("tur_Latn", "Turkish"),
    "uk": ("ukr_Cyrl", "Ukrainian"),
    "ur": ("urd_Arab", "Urdu"),
    "uz": ("uzn_Latn", "Uzbek"),
    "vi": ("vie_Latn", "Vietnamese"),
    "xh": ("xho_Latn", "Xhosa"),
    "yo": ("yor_Latn", "Yoruba"),
    "zh": ("zho_Hans", "Chinese"),
    "zu": ("zul_Latn", "Zulu"),
}

# other spellings seen in data and language identifiers
_ALIASES = {
    "nb": "no",
    "nn": "no",
    "zh-cn": "zh",
    "zh_hans": "zh",
    "zho": "zh",
    "cmn": "zh",
    "zh-hans": "zh",
    "arb": "ar",
    "ara": "ar",
    "swh": "sw",
    "swa": "sw",
    "fil": "tl",
    "iw": "he",
    "in": "id",
    "pes": "fa",
    "lvs": "lv",
    "zsm": "ms",
    "npi": "ne",
    "azj": "az",
    "uzn": "uz",
    "plt": "mg",
    "khk": "mn",
    "als": "sq",
    "pbt": "ps",
    "nob": "no",
}

_FLORES_TO_ISO = {flores.lower(): iso for iso, (flores, _) in _TABLE.items()}
_ISO3_TO_ISO = {flores.split("_")[0].lower(): iso for iso, (flores, _) in _TABLE.items()}
_NAME_TO_ISO = {name.lower(): iso for iso, (_, name) in _TABLE.items()}

# X-ALMA's eight language groups (docs/methods.md, "Direction-aware training"); English is served by every
# group.
GROUPS: dict[int, tuple[str, ...]] = {
    1: ("da", "nl", "de", "is", "no", "sv", "af"),
    2: ("ca", "ro", "gl", "it", "pt", "es"),
    3: ("bg", "mk", "sr", "uk", "ru"),
    4: ("id", "ms", "th", "vi", "mg", "fr"),
    5: ("hu", "el", "cs", "pl", "lt", "lv"),
    6: ("ka", "zh", "ja", "ko", "fi", "et"),
    7: ("gu", "hi", "mr", "ne", "ur"),
    8: ("az", "kk", "ky", "tr", "uz", "ar", "he", "fa"),
}
LANG2GROUP: dict[str, int] = {lang: g for g, langs in GROUPS.items() for lang in langs}

# mFTI's 13 languages (156 directions), docs/methods.md "mFTI"
MFTI_LANGUAGES = ("en", "de", "fr", "ca", "fi", "ru", "bg", "zh", "ko", "ar", "sw", "hi", "ta")


def normalize(code: str) -> str:
    """ISO 639-1 code for an ISO 639-1/639-3, FLORES-200 code or English name (case-insensitive)."""
    if not isinstance(code, str) or not code.strip():
        raise ConfigError(f"empty or non-string language code: {code!r}")
    key = code.strip().lower().replace(" ", "")
    if key in _TABLE:
        return key
    if key in _ALIASES:
        return _ALIASES[key]
    if key in _FLORES_TO_ISO:
        return _FLORES_TO_ISO[key]
    if "_" in key and key.split("_")[0] in _ISO3_TO_ISO:  # e.g. zho_Hant -> zh
        return _ISO3_TO_ISO[key.split("_")[0]]
    if key in _ISO3_TO_ISO:
        return _ISO3_TO_ISO[key]
    if key in _NAME_TO_ISO:
        return _NAME_TO_ISO[key]
    raise ConfigError(f"unknown language code {code!r}; use ISO 639-1 (e.g. 'de') or FLORES-200 (e.g. 'deu_Latn')")


def is_known(code: str) -> bool:
    try:
        normalize(code)
        return True
    except ValueError:
        return False


def to_flores(code: str) -> str:
    return _TABLE[normalize(code)][0]


def to_iso(code: str) -> str:
    return normalize(code)


def name(code: str) -> str:
    """English display name, as used by the mFTI and ALMA prompts."""
    return _TABLE[normalize(code)][1]


def group_of(code: str) -> int | None:
    """X-ALMA group of a language; None for English or a language outside the 8 groups."""
    return LANG2GROUP.get(normalize(code))


def direction_group(src: str, tgt: str) -> int | None:
    """X-ALMA routes a direction by its non-English side."""
    s, t = normalize(src), normalize(tgt)
    other = t if s == "en" else s
    return LANG2GROUP.get(other)


def parse_direction(text: str) -> tuple[str, str]:
    """``"de-en"``, ``"de->en"``, ``"deu_Latn-eng_Latn"`` -> ``("de", "en")``."""
    t = text.strip().replace("->", "-").replace("→", "-")
    parts = t.split("-")
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise ConfigError(f"direction {text!r} must look like 'de-en'")
    src, tgt = normalize(parts[0]), normalize(parts[1])
    if src == tgt:
        raise ConfigError(f"direction {text!r} translates a language into itself")
    return src, tgt


def format_direction(direction: tuple[str, str]) -> str:
    return f"{direction[0]}-{direction[1]}"


def all_languages() -> list[str]:
    return sorted(_TABLE)
