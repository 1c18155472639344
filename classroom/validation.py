"""Input checks at QuLab's edge: what a form or a typed id brings, checked before lesson code runs.

The lesson (source.py) is written like a service layer that is handed clean values (as
full-stack-fastapi-template's `create_user(*, session, user_create)` is handed a validated
`UserCreate`): its models refuse impossible numbers, its repositories and the database refuse a
duplicate email, and that is all. Everything a learner can type is checked here instead, each
refusal a ValidationError that names the field and says what is wrong, so a page shows it next
to the form and nothing is written.

`Lab.run` applies `checked_arguments` to every lesson operation it runs (classroom.runtime), so
every page's input passes through it; the demos check their own inputs with the same functions.
"""

from __future__ import annotations

import re
import unicodedata
import uuid
from collections.abc import Callable
from typing import Any, Optional

import source


class InvalidEmailError(source.ValidationError):
    """The email address is empty, too long or not an address."""


class MalformedIdError(source.ValidationError):
    """An id is not a UUID."""


MAX_EMAIL_LENGTH = 255
MAX_NAME_LENGTH = 255
_EMAIL_PATTERN = re.compile(
    r"^(?=[^@]{1,64}@)[A-Za-z0-9_%+-]+(?:\.[A-Za-z0-9_%+-]+)*"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}$"
)
# SOC (15-1252) or O*NET-SOC (15-1252.00) codes, ASCII digits only (\d also matches ٥ or ５).
_OCCUPATION_CODE_PATTERN = re.compile(r"[0-9]{2}-[0-9]{4}(?:\.[0-9]{2})?")
_NAME_PUNCTUATION = set(" .,'-\u2019")


def required_text(value: Any, *, label: str, max_length: int, field: str) -> str:
    """The text, whitespace collapsed; refused when blank, too long or holding markup."""
    cleaned = " ".join(value.split()) if isinstance(value, str) else ""
    if not cleaned:
        problem = "is required; it cannot be blank"
    elif len(cleaned) > max_length:
        problem = f"is too long: {len(cleaned)} characters, the limit is {max_length}"
    elif "<" in cleaned or ">" in cleaned:
        problem = "must not contain markup such as < or >"
    else:
        return cleaned
    raise source.ValidationError(f"{label} {problem}.", field=field)


def validate_email(value: Any) -> str:
    """The trimmed email, or InvalidEmailError saying what is wrong with it."""
    email = value.strip() if isinstance(value, str) else ""
    if not email:
        problem = "Email is required."
    elif len(email) > MAX_EMAIL_LENGTH:
        problem = f"Email is too long: {len(email)} characters, the limit is {MAX_EMAIL_LENGTH}."
    elif not _EMAIL_PATTERN.fullmatch(email):
        problem = (
            "That is not a valid email address; expected something like alex.smith@example.com."
        )
    else:
        return email
    raise InvalidEmailError(problem, field="email")


def validate_name(value: Any) -> str:
    """The name, whitespace collapsed: letters, digits, spaces and . , ' - only."""
    name = required_text(value, label="Name", max_length=MAX_NAME_LENGTH, field="name")
    for character in name:
        if character not in _NAME_PUNCTUATION and unicodedata.category(character)[0] not in "LMN":
            found = unicodedata.name(character, "a control character")
            raise source.ValidationError(
                f"Name may contain only letters, digits, spaces and . , ' - (found {found}).",
                field="name",
            )
    if not any(unicodedata.category(character)[0] == "L" for character in name):
        raise source.ValidationError("Name must contain at least one letter.", field="name")
    return name


def validate_occupation_code(value: Any, *, required: bool = False) -> Optional[str]:
    """An SOC / O*NET-SOC code such as 15-1252 or 15-1252.00; None when optional and blank."""
    blank = value is None or (isinstance(value, str) and not value.strip())
    if blank and not required:
        return None
    if blank:
        problem = "is required, e.g. 15-1252.00"
    elif not isinstance(value, str) or not _OCCUPATION_CODE_PATTERN.fullmatch(value.strip()):
        problem = "must look like 15-1252 or 15-1252.00 (an SOC / O*NET-SOC code)"
    else:
        return value.strip()
    raise source.ValidationError(f"Occupation code {problem}.", field="occupation_code")


def validate_education_level(value: Any) -> Optional[str]:
    """One of source.EDUCATION_LEVELS, or None when blank."""
    if (
        value is None
        or value in source.EDUCATION_LEVELS
        or (isinstance(value, str) and not value.strip())
    ):
        return value or None
    levels = ", ".join(source.EDUCATION_LEVELS)
    raise source.ValidationError(
        f"Education level must be one of: {levels}.", field="education_level"
    )


def validate_years_experience(value: Any) -> Optional[float]:
    """Years of experience from 0 to 80, at most two decimals (a number, or text such as "2.5");
    None when not given. What a form shows is what is stored: nothing rounded away."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        text_value = value.strip()
        # A sign is read, so "-5" is told the range rather than that it is not a number.
        if not re.fullmatch(r"-?[0-9]*\.?[0-9]+", text_value):
            raise source.ValidationError(
                f"Years of experience must be a number such as 4 or 2.5; got {text_value!r}.",
                field="years_experience",
            )
        value = float(text_value) or 0.0  # "-0" is 0
    years = source.validate_number(
        value, label="Years of experience", low=0, high=80, field="years_experience"
    )
    if round(years, 2) != years:
        raise source.ValidationError(
            "Years of experience takes at most two decimals (2.25, not 2.251).",
            field="years_experience",
        )
    return years


def parse_entity_id(value: Any, *, what: str = "user") -> str:
    """The canonical lowercase UUID text, or MalformedIdError naming what was expected."""
    if not isinstance(value, str) or not value.strip():
        raise MalformedIdError(f"Enter a {what} id.", field=f"{what}_id")
    try:
        if len(value.strip()) > 64:
            raise ValueError("far too long for a UUID")
        return str(uuid.UUID(value.strip()))
    except ValueError:
        raise MalformedIdError(
            f"That is not a valid {what} id: expected a UUID such as "
            "3f2b9c1e-8d4a-4c7e-9b1f-2a6d5e8c0f11.",
            field=f"{what}_id",
        ) from None


def new_user_fields(
    *,
    email: Any,
    name: Any,
    occupation_code: Any = None,
    education_level: Any = None,
    years_experience: Any = None,
) -> dict[str, Any]:
    """Section 1's Create User form, checked field by field: what create_user is handed."""
    return {
        "email": validate_email(email),
        "name": validate_name(name),
        "occupation_code": validate_occupation_code(occupation_code),
        "education_level": validate_education_level(education_level),
        "years_experience": validate_years_experience(years_experience),
    }


# A typed-in argument of any lesson operation, and its check; anything else passes as given.
_ARGUMENT_CHECKS: dict[str, Callable[[Any], Any]] = {"user_id": parse_entity_id}
# The operations that store a score need its occupation code.
_SCORING = (source.calculate_and_store_airscore,)


def checked_arguments(operation: Callable[..., Any], arguments: dict[str, Any]) -> dict[str, Any]:
    """The arguments of a lesson operation, checked and cleaned; ValidationError if refused."""
    if operation is source.create_user:
        return new_user_fields(**arguments)
    checked = {
        name: _ARGUMENT_CHECKS[name](value) if name in _ARGUMENT_CHECKS else value
        for name, value in arguments.items()
    }
    if operation in _SCORING:
        code = arguments.get("occupation_code")
        checked["occupation_code"] = validate_occupation_code(code, required=True)
    return checked
