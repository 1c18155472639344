"""Repositories: specific errors, nothing written on refusal (input: classroom.validation)."""

import pytest

import source
from source import AIRScoreRepository, AssessmentRepository, UserRepository, get_session

SQL_TEXT = "'; DROP TABLE users; --"
MARKUP = "<script>alert(1)</script>"
UNKNOWN_ID = "3f2b9c1e-8d4a-4c7e-9b1f-2a6d5e8c0f11"


async def test_create_then_get_by_id_and_by_email_in_any_case(sandbox):
    user = await source.create_user(
        sandbox,
        email="Alex.Smith@Example.com",
        name="Alex Smith",
        occupation_code="15-1252.00",
        education_level="Master's degree",
        years_experience=8,
    )
    async with get_session(sandbox) as session:
        repository = UserRepository(session)
        assert (await repository.get(user.id)).email == "Alex.Smith@Example.com"
        assert (await repository.get_by_email("alex.smith@example.COM")).id == user.id
        assert await repository.get_by_email("nobody@example.com") is None
        assert [u.id for u in await repository.list()] == [user.id]


async def test_a_refused_duplicate_writes_nothing_and_keeps_the_original(sandbox):
    original = await source.create_user(sandbox, email="jane@example.com", name="Jane")
    with pytest.raises(source.DuplicateEmailError):
        await source.create_user(sandbox, email="JANE@example.com", name="Impostor")
    users = await source.list_users(sandbox)
    assert [(u.id, u.name) for u in users] == [(original.id, "Jane")]


async def test_sql_text_is_stored_as_plain_data_where_it_is_allowed(sandbox):
    # Names refuse ';', but apostrophes are legal: bound parameters keep them inert.
    user = await source.create_user(
        sandbox, email="o.brien@example.com", name="Robert O'Brien-Tables"
    )
    assert (await source.list_users(sandbox))[0].name == "Robert O'Brien-Tables"
    assert (await source.count_rows(sandbox))["users"] == 1
    assert user.name == "Robert O'Brien-Tables"


@pytest.mark.parametrize(
    ("user_id", "error"),
    [("not-a-uuid", source.UserNotFoundError), (UNKNOWN_ID, source.UserNotFoundError)],
)
async def test_get_with_an_unknown_id_raises_a_specific_error(sandbox, user_id, error):
    async with get_session(sandbox) as session:
        with pytest.raises(error):
            await UserRepository(session).get(user_id)


async def test_delete_unknown_user_raises_not_found(sandbox):
    with pytest.raises(source.UserNotFoundError):
        await source.delete_user(sandbox, user_id=UNKNOWN_ID)


async def test_assessments_and_scores_belong_to_existing_users(sandbox):
    user = await source.create_user(sandbox, email="a@example.com", name="A")
    async with get_session(sandbox) as session:
        assessment = await AssessmentRepository(session).create(user_id=user.id, component="verbal")
        first = await AIRScoreRepository(session).create(
            user_id=user.id,
            occupation_code="15-1252",
            air_score=50,
            vr_score=40,
            hr_score=60,
            synergy_score=45,
            ci_lower=45,
            ci_upper=55,
            parameter_version="v1",
        )
        second = await AIRScoreRepository(session).create(
            user_id=user.id,
            occupation_code="15-1252",
            air_score=70,
            vr_score=60,
            hr_score=80,
            synergy_score=65,
            ci_lower=65,
            ci_upper=75,
            parameter_version="v1",
        )
    async with get_session(sandbox) as session:
        assert [a.id for a in await AssessmentRepository(session).list_for_user(user.id)] == [
            assessment.id
        ]
        assert [s.id for s in await AIRScoreRepository(session).list_for_user(user.id)] == [
            first.id,
            second.id,
        ]
        assert (await AIRScoreRepository(session).latest_for_user(user.id)).id == second.id
        with pytest.raises(source.UserNotFoundError):
            await AssessmentRepository(session).create(user_id=UNKNOWN_ID, component="verbal")


async def test_scores_outside_their_range_are_refused(sandbox):
    user = await source.create_user(sandbox, email="a@example.com", name="A")
    with pytest.raises(source.ValidationError, match="confidence interval"):
        async with get_session(sandbox) as session:
            await AIRScoreRepository(session).create(
                user_id=user.id,
                occupation_code="15-1252",
                air_score=90,
                vr_score=40,
                hr_score=60,
                synergy_score=45,
                ci_lower=45,
                ci_upper=55,
                parameter_version="v1",
            )
    assert (await source.count_rows(sandbox))["air_scores"] == 0


@pytest.mark.parametrize(
    "ability", [float("nan"), float("inf"), -float("inf"), 1e308, -1e308, True]
)
async def test_an_assessment_with_an_impossible_ability_is_refused_and_nothing_is_written(
    sandbox_with_users, ability
):
    user = (await source.list_users(sandbox_with_users))[0]
    async with get_session(sandbox_with_users) as session:
        with pytest.raises(source.ValidationError, match="Current ability"):
            await AssessmentRepository(session).create(
                user_id=user.id, component="reading", current_ability=ability
            )
    assert (await source.count_rows(sandbox_with_users))["assessments"] == 0


@pytest.mark.parametrize("limit", [-1, True, 2.5, "10", 10**9])
async def test_list_limits_are_validated_before_any_query(sandbox_with_users, limit):
    with pytest.raises(source.ValidationError, match="Limit"):
        await source.list_users(sandbox_with_users, limit=limit)
