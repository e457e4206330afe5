"""S710–S742: grading table, grade → colour map, alert.

S710–S720: a finding's grade is the highest grade of the configured rules it matches
(finding group/type, minimum probability, minimum equivalent diameter), 1 if none.
S730: each grade has one sRGB colour. S741–S742: a finding whose grade reaches the
configured alert grade raises the alert (the study alerts if any finding does).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import GradeRule, GradingConfig
from pipeline.result import FindingType


@dataclass(frozen=True, slots=True, kw_only=True)
class Grading:
    grade: int
    colour: tuple[int, int, int]
    alert: bool


def rule_matches(
    rule: GradeRule, finding_type: FindingType, probability: float, diameter_mm: float | None
) -> bool:
    """S710: does the finding satisfy this row of the grading table?"""
    if rule.groups and finding_type.group not in rule.groups:
        return False
    if rule.finding_types and finding_type not in rule.finding_types:
        return False
    if probability < rule.min_probability:
        return False
    return not (
        rule.min_diameter_mm > 0 and (diameter_mm is None or diameter_mm < rule.min_diameter_mm)
    )


def grade_of(
    finding_type: FindingType,
    probability: float,
    diameter_mm: float | None,
    config: GradingConfig,
) -> int:
    """S710–S720: the highest grade among matching rules; 1 when none matches."""
    grades = [
        r.grade for r in config.rules if rule_matches(r, finding_type, probability, diameter_mm)
    ]
    return max(grades, default=1)


def grade(
    finding_type: FindingType,
    probability: float,
    diameter_mm: float | None,
    config: GradingConfig,
    alert_grade: int,
    alert_threshold: float | None = None,
) -> Grading:
    """S710–S742: grade, its colour and the alert flag of one finding; with the model's
    ``alert_threshold``, a finding below it stays under ``alert_grade``."""
    g = grade_of(finding_type, probability, diameter_mm, config)
    if alert_threshold is not None and probability < alert_threshold and alert_grade > 1:
        g = min(g, alert_grade - 1)
    return Grading(grade=g, colour=config.colour_of(g), alert=g >= alert_grade)
