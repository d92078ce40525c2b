"""Training units: which directions train together (XX->En per group or language, En->XX jointly or per group)."""

from __future__ import annotations

from dataclasses import dataclass, field

from mmt import languages as L
from mmt.errors import ConfigError

from .config import PIVOT, Config


@dataclass
class TrainingUnit:
    """One separately trained model: a name, its side (xx-en or en-xx) and its directions."""

    name: str
    side: str
    directions: list[tuple[str, str]] = field(default_factory=list)


def _groups(config: Config) -> dict[str, list[str]]:
    if config.groups is not None:
        return {str(k): [L.normalize(c) for c in v] for k, v in config.groups.items()}
    return {f"g{g}": list(langs) for g, langs in L.GROUPS.items()}


def _group_of(lang: str, groups: dict[str, list[str]]) -> str:
    for name, langs in groups.items():
        if lang in langs:
            return name
    return f"other-{lang}"  # a language outside every group trains as its own unit


def plan_units(config: Config, directions: list[tuple[str, str]]) -> list[TrainingUnit]:
    """Split En-centric directions into training units (XX->En per group/language, En->XX joint/per group)."""
    if config.separate_unit not in ("group", "language"):
        raise ConfigError(f"directional: separate_unit must be 'group' or 'language', got {config.separate_unit!r}")
    if config.en_xx_unit not in ("all", "group"):
        raise ConfigError(f"directional: en_xx_unit must be 'all' or 'group', got {config.en_xx_unit!r}")
    groups = _groups(config)
    units: dict[str, TrainingUnit] = {}
    for src, tgt in directions:
        src, tgt = L.normalize(src), L.normalize(tgt)
        if tgt == PIVOT and src != PIVOT:
            key = _group_of(src, groups) if config.separate_unit == "group" else src
            name = f"xx-en.{key}"
            units.setdefault(name, TrainingUnit(name, "xx-en")).directions.append((src, tgt))
        elif src == PIVOT and tgt != PIVOT:
            name = "en-xx.all" if config.en_xx_unit == "all" else f"en-xx.{_group_of(tgt, groups)}"
            units.setdefault(name, TrainingUnit(name, "en-xx")).directions.append((src, tgt))
        else:
            raise ConfigError(
                f"directional: direction {src}-{tgt} is not English-centric; DAT splits XX->En "
                "and En->XX (drop it from data.train or method.directions)"
            )
    return sorted(units.values(), key=lambda u: (u.side != "xx-en", u.name))


def parse_direction_list(items: list[str]) -> list[tuple[str, str]]:
    return [L.parse_direction(d) for d in items]
