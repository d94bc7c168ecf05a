"""What a coordinator writes to create a content version (API body and ``--file`` JSON).

Settings use the terminal's own config keys and ranges (firmware/terminal/config.py and
content.py), so a package the fleet builds is never refused by a terminal as ``bad_package``.
"""

from __future__ import annotations

from typing import Annotated, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

from fleet.services import registry

NO_NUL = r"^[^\x00]*$"
# Control characters would be drawn as boxes; texts may break lines with \n, labels not.
TEXT_CHARS = r"^[^\x00-\x09\x0b-\x1f\x7f]*$"
LABEL_CHARS = r"^[^\x00-\x1f\x7f]*$"
MAX_LANGUAGES = 8
MAX_MS_SETTING = 3_600_000  # the terminal's bound on its *_ms settings
BURST_COUNT_MAX = 64  # firmware/terminal/abuse.py

LanguageCode = Annotated[str, StringConstraints(pattern=r"^[a-z]{2,3}(?:-[A-Za-z0-9]{1,8})?$"),
                         Field(examples=["fi", "zh-Hans"])]
Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=300,
                                        pattern=TEXT_CHARS)]
Label = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=40,
                                         pattern=LABEL_CHARS)]
SettingMs = Annotated[int, Field(ge=0, le=MAX_MS_SETTING)]
HHMM = Annotated[str, StringConstraints(pattern=r"^(?:(?:[01]\d|2[0-3]):[0-5]\d|24:00)$")]
Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
# [open, close] as lists: the form the registry's check returns and the body stores.
Interval = Annotated[list[HHMM], Field(min_length=2, max_length=2)]


def _week(value: dict[Weekday, list[Interval]]) -> dict[str, list[list[str]]]:
    return registry.check_opening_hours(value, field="hours.week")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LanguageTexts(_Strict):
    """The texts of one language."""

    question: Text
    thanks: Text
    labels: list[Label] | None = Field(
        default=None, description="one per button, left to right; needs `buttons`")


class ContentSettings(_Strict):
    """Terminal settings the content overrides; an absent key keeps the terminal's value."""

    min_gap_ms: SettingMs | None = None
    burst_count: Annotated[int, Field(ge=0, le=BURST_COUNT_MAX)] | None = None
    burst_window_ms: SettingMs | None = None
    burst_quiet_ms: SettingMs | None = None
    brightness: Annotated[int, Field(ge=0, le=255)] | None = None
    idle: Literal["on", "dim", "off"] | None = None


class Hours(_Strict):
    """Opening hours in the site's local time; outside them the terminal dims or sleeps."""

    week: Annotated[dict[Weekday, list[Interval]], AfterValidator(_week),
                    Field(examples=[{"mon": [["08:00", "20:00"]]}])]
    timezone: Annotated[str, StringConstraints(max_length=64),
                        AfterValidator(lambda v: registry.check_timezone(
                            v, field="hours.timezone")),
                        Field(examples=["Europe/Helsinki"])]


class ContentBody(_Strict):
    """A content version as created (docs/content.md, "Creating content")."""

    name: Annotated[str, StringConstraints(strip_whitespace=True, max_length=200,
                                           pattern=NO_NUL)] = ""
    languages: dict[LanguageCode, LanguageTexts] = Field(
        min_length=1, max_length=MAX_LANGUAGES,
        description="texts per language, in the order the terminal rotates through them")
    buttons: Annotated[int, Field(ge=2, le=5)] | None = Field(
        default=None, description="how many buttons the labels are for")
    show: str = Field(default="rotate", description="a language of `languages`, or rotate")
    rotate_s: Annotated[int, Field(ge=2, le=3600)] = 8
    settings: ContentSettings = Field(default_factory=ContentSettings)
    hours: Hours | None = None
    hours_from_site: Annotated[int, Field(ge=1, le=2**31 - 1)] | None = Field(
        default=None, description="copy the site's weekly hours and time zone at creation")
    outside: Literal["dim", "off"] = Field(
        default="dim", description="what the display does outside opening hours")

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.show != "rotate" and self.show not in self.languages:
            raise ValueError(f"show: {self.show!r} is neither 'rotate' nor one of the "
                             f"languages ({', '.join(self.languages)})")
        for code, texts in self.languages.items():
            if texts.labels is None:
                continue
            if self.buttons is None:
                raise ValueError(f"languages.{code}.labels: set `buttons` to say how many "
                                 "buttons the labels are for")
            if len(texts.labels) != self.buttons:
                raise ValueError(f"languages.{code}.labels: {len(texts.labels)} labels for "
                                 f"{self.buttons} buttons; give one per button")
        if self.hours is not None and self.hours_from_site is not None:
            raise ValueError("give either hours or hours_from_site, not both")
        return self

    def header_settings(self) -> dict[str, int | str]:
        """The package header's ``settings``: only the keys the content sets."""
        return self.settings.model_dump(exclude_none=True)
