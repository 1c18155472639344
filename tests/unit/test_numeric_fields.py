"""Numbers are numbers: True, False, NaN and ±inf are refused by every numeric field of the
models, whatever code sets them, and by the repositories, with nothing written.

To Python True is 1 and False is 0, so a boolean passed as a score would be stored as 1.0; NaN
compares false with everything, so a range check alone lets it through.
"""

import math

import pytest

import source
from source import AIRScore, AIRScoreRepository, Assessment, User, get_session

NOT_NUMBERS = [True, False, math.nan, math.inf, -math.inf]
GOOD_SCORE = dict(
    air_score=70.0, vr_score=65.0, hr_score=75.0, synergy_score=68.0, ci_lower=60.0, ci_upper=80.0
)


def numeric_fields(model) -> list[str]:
    """Every column of the model that holds a number (found from the table, so a new one counts)."""
    return [
        column.key
        for column in model.__table__.columns
        if not column.primary_key
        and not column.foreign_keys
        and column.type.python_type in (int, float)
    ]


def test_the_models_numeric_fields_are_the_ones_checked_here():
    assert numeric_fields(User) == ["years_experience"]
    assert numeric_fields(Assessment) == ["current_ability", "items_administered"]
    assert numeric_fields(AIRScore) == list(source.SCORE_FIELDS)


@pytest.mark.parametrize("value", NOT_NUMBERS, ids=repr)
@pytest.mark.parametrize(
    ("model", "field"),
    [(model, field) for model in (User, Assessment, AIRScore) for field in numeric_fields(model)],
    ids=lambda item: getattr(item, "__name__", item),
)
def test_every_numeric_field_of_the_models_refuses_it(model, field, value):
    with pytest.raises(source.ValidationError):
        model(**{field: value})
    row = model()
    with pytest.raises(source.ValidationError):
        setattr(row, field, value)  # set later, as code that loaded a row would


@pytest.mark.parametrize("value", [2.5, -1, 10**9, "3"], ids=repr)
def test_items_administered_is_a_whole_count(value):
    with pytest.raises(source.ValidationError, match="Items administered"):
        Assessment(items_administered=value)
    assert Assessment(items_administered=12).items_administered == 12


@pytest.mark.parametrize("value", NOT_NUMBERS, ids=repr)
@pytest.mark.parametrize("field", source.SCORE_FIELDS)
async def test_the_score_repository_refuses_it_and_writes_nothing(sandbox, field, value):
    user = await source.create_user(sandbox, email="a@example.com", name="A")
    with pytest.raises(source.ValidationError, match=field):
        async with get_session(sandbox) as session:
            await AIRScoreRepository(session).create(
                user_id=user.id,
                occupation_code="15-1252.00",
                parameter_version="v1",
                **{**GOOD_SCORE, field: value},
            )
    assert (await source.count_rows(sandbox))["air_scores"] == 0


@pytest.mark.parametrize("value", NOT_NUMBERS, ids=repr)
async def test_the_user_repository_refuses_it_as_years_of_experience(sandbox, value):
    with pytest.raises(source.ValidationError, match="Years of experience"):
        await source.create_user(sandbox, email="a@example.com", name="A", years_experience=value)
    assert (await source.count_rows(sandbox))["users"] == 0


@pytest.mark.parametrize("value", NOT_NUMBERS, ids=repr)
async def test_an_assessment_counting_it_as_items_is_refused_and_nothing_is_written(sandbox, value):
    user = await source.create_user(sandbox, email="a@example.com", name="A")
    with pytest.raises(source.ValidationError, match="Items administered"):
        async with get_session(sandbox) as session:
            assessment = await source.AssessmentRepository(session).create(
                user_id=user.id, component="reading"
            )
            assessment.items_administered = value
    assert (await source.count_rows(sandbox))["assessments"] == 0
