"""Input checks at QuLab's edge (classroom.validation): every refusal names the problem; good
input comes back normalised; through Lab.run, a refusal writes nothing."""

import pytest

import source
from classroom import validation
from classroom.sandboxes.sandbox import new_sandbox_id

SQL_TEXT = "'; DROP TABLE users; --"
MARKUP = "<script>alert(1)</script>"


@pytest.mark.parametrize(
    ("email", "message"),
    [
        ("", "required"),
        ("   ", "required"),
        (None, "required"),
        ("a" * 300 + "@example.com", "too long"),
        ("not-an-email", "not a valid email"),
        ("alex@", "not a valid email"),
        ("alex smith@example.com", "not a valid email"),
        (MARKUP, "not a valid email"),
        (SQL_TEXT, "not a valid email"),
        ("alex@example.com'; DROP TABLE users; --", "not a valid email"),
    ],
)
def test_bad_emails_are_refused_with_a_reason(email, message):
    with pytest.raises(validation.InvalidEmailError, match=message):
        validation.validate_email(email)


def test_good_email_is_trimmed_and_keeps_its_case():
    assert validation.validate_email("  Alex.Smith+qa@Example.COM ") == "Alex.Smith+qa@Example.COM"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "required"),
        ("  \t ", "required"),
        ("x" * 300, "too long"),
        (MARKUP, "markup"),
        (SQL_TEXT, "only letters"),
        ("1234", "at least one letter"),
        ("Alex\u0000Smith", "only letters"),
    ],
)
def test_bad_names_are_refused_with_a_reason(name, message):
    with pytest.raises(source.ValidationError, match=message):
        validation.validate_name(name)


@pytest.mark.parametrize(
    "name", ["Seán O'Brien-Ní Dhuibhir", "Zoë Ångström", "José María, Jr.", "李小龍"]
)
def test_real_names_are_accepted(name):
    assert validation.validate_name(name) == name


def test_name_whitespace_is_collapsed():
    assert validation.validate_name("  Alex \n  Smith ") == "Alex Smith"


@pytest.mark.parametrize("value", ["15-1252", "15-1252.00"])
def test_occupation_codes_in_soc_form_are_accepted(value):
    assert validation.validate_occupation_code(value) == value


@pytest.mark.parametrize(
    "value",
    ["151252", "engineer", "15-1252.0", SQL_TEXT, "١٥-١٢٥٢", "１５-１２５２.００", "15-1252.00\nx"],
)
def test_other_occupation_codes_are_refused(value):
    with pytest.raises(source.ValidationError, match="Occupation code"):
        validation.validate_occupation_code(value)


@pytest.mark.parametrize(
    "value", [-1, 81, float("nan"), float("inf"), "ten", True, False, "٣", "１０", 1e308]
)
def test_years_of_experience_out_of_range_are_refused(value):
    with pytest.raises(source.ValidationError, match="Years of experience"):
        validation.validate_years_experience(value)


def test_unknown_education_level_is_refused():
    with pytest.raises(source.ValidationError, match="Education level"):
        validation.validate_education_level("Hogwarts")


def test_ids_are_normalised_to_canonical_uuids():
    assert (
        validation.parse_entity_id(" 3F2B9C1E-8D4A-4C7E-9B1F-2A6D5E8C0F11 ")
        == "3f2b9c1e-8d4a-4c7e-9b1f-2a6d5e8c0f11"
    )


@pytest.mark.parametrize("value", ["", "42", "not-a-uuid", SQL_TEXT, "x" * 500, None])
def test_malformed_ids_are_refused(value):
    with pytest.raises(validation.MalformedIdError):
        validation.parse_entity_id(value)


@pytest.mark.parametrize(
    "value", [float("nan"), float("inf"), float("-inf"), 1e308, -1e308, True, "1", None, 10.5]
)
def test_numbers_must_be_finite_real_numbers_within_bounds(value):
    with pytest.raises(source.ValidationError, match="Current ability"):
        source.validate_number(value, label="Current ability", low=-10, high=10)


@pytest.mark.parametrize("value", [True, False, 1.0, -1, "3", None])
def test_whole_numbers_refuse_booleans_floats_and_text(value):
    with pytest.raises(source.ValidationError, match="Reads must be a whole number from 0 to 10"):
        source.validate_whole_number(value, label="Reads", low=0, high=10)


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"email": "", "name": "Alex"}, validation.InvalidEmailError),
        ({"email": "   ", "name": "Alex"}, validation.InvalidEmailError),
        ({"email": "a" * 300 + "@example.com", "name": "Alex"}, validation.InvalidEmailError),
        ({"email": "not-an-email", "name": "Alex"}, validation.InvalidEmailError),
        ({"email": MARKUP, "name": "Alex"}, validation.InvalidEmailError),
        ({"email": SQL_TEXT, "name": "Alex"}, validation.InvalidEmailError),
        ({"email": "ok@example.com", "name": ""}, source.ValidationError),
        ({"email": "ok@example.com", "name": "   "}, source.ValidationError),
        ({"email": "ok@example.com", "name": "x" * 300}, source.ValidationError),
        ({"email": "ok@example.com", "name": MARKUP}, source.ValidationError),
        ({"email": "ok@example.com", "name": SQL_TEXT}, source.ValidationError),
        (
            {"email": "ok@example.com", "name": "Alex", "occupation_code": SQL_TEXT},
            source.ValidationError,
        ),
        (
            {"email": "ok@example.com", "name": "Alex", "years_experience": "-3"},
            source.ValidationError,
        ),
    ],
)
def test_a_form_s_bad_input_is_refused_before_the_lesson_runs_and_writes_nothing(
    runtime, fields, error
):
    lab = runtime.lab(new_sandbox_id())
    with pytest.raises(error):
        lab.run(source.create_user, **fields)
    assert lab.run(source.count_rows)["users"] == 0


def test_what_the_form_shows_is_what_the_lesson_is_handed(runtime):
    lab = runtime.lab(new_sandbox_id())
    user = lab.run(
        source.create_user,
        email="  Alex.Smith@Example.com ",
        name="  Alex   Smith ",
        occupation_code=" 15-1252.00 ",
        education_level="",
        years_experience="2.5",
    )
    stored = (user.email, user.name, user.occupation_code, user.education_level)
    assert stored == ("Alex.Smith@Example.com", "Alex Smith", "15-1252.00", None)
    assert user.years_experience == 2.5


@pytest.mark.parametrize(
    ("operation", "arguments", "field"),
    [
        (source.fetch_user_and_scores_naive, {"user_id": "not-a-uuid"}, "user_id"),
        (source.add_sample_scores, {"user_id": "'; DROP TABLE users; --"}, "user_id"),
        (
            source.calculate_and_store_airscore,
            {"user_id": "3f2b9c1e-8d4a-4c7e-9b1f-2a6d5e8c0f11", "occupation_code": "engineer"},
            "occupation_code",
        ),
    ],
)
def test_typed_ids_and_codes_are_checked_for_every_operation(runtime, operation, arguments, field):
    lab = runtime.lab(new_sandbox_id())
    with pytest.raises(source.ValidationError) as refused:
        lab.run(operation, **arguments)
    assert refused.value.field == field
    counts = lab.run(source.count_rows)
    assert (counts["air_scores"], counts["domain_events"]) == (0, 0)
