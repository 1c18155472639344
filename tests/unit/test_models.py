"""Models: the constraints the database itself enforces, whatever code writes to it."""

from datetime import UTC

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

import source
from source import AIRScore, Assessment, User, get_session


def _score(user_id: str, **overrides) -> AIRScore:
    values = dict(
        user_id=user_id,
        occupation_code="15-1252.00",
        air_score=70.0,
        vr_score=65.0,
        hr_score=75.0,
        synergy_score=68.0,
        ci_lower=60.0,
        ci_upper=80.0,
        parameter_version="v1.0",
    )
    values.update(overrides)
    return AIRScore(**values)


async def _count(sandbox, model) -> int:
    async with get_session(sandbox) as session:
        return await session.scalar(select(func.count()).select_from(model))


async def test_email_is_unique_even_when_written_around_the_repository(sandbox):
    async with get_session(sandbox) as session:
        session.add(User(email="alex@example.com", name="Alex"))
    with pytest.raises(IntegrityError):
        async with get_session(sandbox) as session:
            session.add(User(email="ALEX@Example.com", name="Other Alex"))
    assert await _count(sandbox, User) == 1


async def test_duplicate_email_in_another_case_is_refused_by_the_repository(sandbox):
    await source.create_user(sandbox, email="jane.doe@example.com", name="Jane Doe")
    with pytest.raises(source.DuplicateEmailError, match="already exists"):
        await source.create_user(sandbox, email="Jane.Doe@EXAMPLE.com", name="Jane Again")
    assert await _count(sandbox, User) == 1


async def test_deleting_a_user_deletes_their_assessments_and_scores(sandbox):
    user = await source.create_user(sandbox, email="alex@example.com", name="Alex")
    keeper = await source.create_user(sandbox, email="keeper@example.com", name="Keeper")
    async with get_session(sandbox) as session:
        session.add_all([_score(user.id), _score(user.id), _score(keeper.id)])
        session.add(Assessment(user_id=user.id, component="verbal"))
    await source.delete_user(sandbox, user_id=user.id)
    assert await source.count_rows(sandbox) == {
        "users": 1,
        "assessments": 0,
        "air_scores": 1,
        "domain_events": 0,
        "consumed_events": 0,
    }


async def test_database_cascade_also_holds_for_a_bulk_delete(sandbox):
    user = await source.create_user(sandbox, email="alex@example.com", name="Alex")
    async with get_session(sandbox) as session:
        session.add(_score(user.id))
    async with get_session(sandbox) as session:
        await session.execute(source.delete(User).where(User.id == user.id))
    assert await _count(sandbox, AIRScore) == 0


async def test_a_score_for_an_unknown_user_is_refused_by_the_repository(sandbox):
    unknown = "3f2b9c1e-8d4a-4c7e-9b1f-2a6d5e8c0f11"
    with pytest.raises(source.UserNotFoundError):
        async with get_session(sandbox) as session:
            await source.AIRScoreRepository(session).create(
                user_id=unknown,
                occupation_code="15-1252.00",
                air_score=70,
                vr_score=60,
                hr_score=80,
                synergy_score=65,
                ci_lower=60,
                ci_upper=80,
                parameter_version="v1",
            )
    assert await _count(sandbox, AIRScore) == 0


async def test_a_score_for_an_unknown_user_is_refused_by_the_foreign_key(sandbox):
    with pytest.raises(IntegrityError):
        async with get_session(sandbox) as session:
            session.add(_score("3f2b9c1e-8d4a-4c7e-9b1f-2a6d5e8c0f11"))
    assert await _count(sandbox, AIRScore) == 0


async def test_timestamps_are_timezone_aware_utc_after_a_round_trip(sandbox):
    user = await source.create_user(sandbox, email="alex@example.com", name="Alex")
    async with get_session(sandbox) as session:
        loaded = await session.get(User, user.id)
    assert loaded.created_at.tzinfo is not None
    assert loaded.created_at.utcoffset() == UTC.utcoffset(None)
    assert loaded.created_at == user.created_at


async def test_updated_at_moves_on_update(sandbox):
    # No wait needed: source.utc_now() strictly increases, so the update's stamp is later.
    user = await source.create_user(sandbox, email="alex@example.com", name="Alex")
    async with get_session(sandbox) as session:
        (await session.get(User, user.id)).name = "Alex S."
    async with get_session(sandbox) as session:
        loaded = await session.get(User, user.id)
    assert loaded.updated_at > loaded.created_at
    assert loaded.updated_at > user.updated_at


def test_utc_now_strictly_increases():
    stamps = [source.utc_now() for _ in range(1000)]
    assert all(earlier < later for earlier, later in zip(stamps, stamps[1:], strict=False))


def test_relationships_are_lazy_by_default():
    for relationship in (User.scores, User.assessments, AIRScore.user, Assessment.user):
        assert relationship.property.lazy == "select"
