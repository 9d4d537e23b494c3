"""The retention planner: ``plan(backups, policy, now)`` decides what to keep and why, with no I/O.

Rotation (``pgkeeper.rotate``) lists a target, calls ``plan`` and deletes what it says; this
module only decides, so every rule below is a pure function of the manifests and ``now`` and is
property-tested. A backup is **kept if any rule keeps it**; every decision carries the names of
the rules that made it.

Which backups count
    Only *good* backups take part in the keep rules: those whose verification passed (or, when
    verification is off, ``require_verified=False``, every backup that has not failed one).
    A backup that **failed verification** or is still **unverified** never satisfies a keep
    rule, never takes a place in a count or a period, and never adds to the size total, so it
    can never push a good backup out. It is kept for ``failed_grace`` (unverified: since it
    finished, so the verify flow has time to run; failed: since the failing check, so an
    operator can inspect it) and deleted after that. Incomplete backups (no manifest) are not
    seen here at all: ``rotate`` removes them after the same grace.

Groups
    Backups are planned per *group*: one database on one server (``database``, ``server`` of
    the manifest), so a target that holds two databases keeps N of each. A server's base
    backups (point-in-time recovery) are a group of their own. The size limit is the
    exception: it is about the target's disk, so it spans every group.

The rules, per group, over the good backups ordered newest first by their own recorded start
time (``Manifest.started_at``; never a name or a storage timestamp; ties broken by finish time,
then id, only to be deterministic):

    newest verified   the newest verified backup: never deleted by any rule, size included
                      (with verification off, the newest good backup too: "newest").
    minimum count     the ``min_backups`` newest good backups: never deleted, size included;
                      this is what keeps a store from emptying when backups fail for weeks.
    last i/N          the ``keep_last`` newest good backups (``BACKUP_MAX_BACKUPS``).
    hourly/daily/weekly/monthly/yearly i/N
                      grandfather-father-son, with **restic's ``forget --keep-*`` semantics**
                      (restic >= 0.16, ``internal/restic/snapshot_policy.go``): walking newest
                      first, keep the newest backup of each period (hour, day, ISO week, month,
                      year in ``timezone``) until N periods that have a backup are kept; periods
                      without a backup do not count. If the walk reaches the oldest backup with
                      some of the N left, the oldest is kept too ("oldest daily 3/7"), so a young
                      history is not trimmed before it reaches N periods. Each rule walks
                      independently: one backup may be the daily and the weekly and the monthly.
    within 7d         every good backup recorded at most ``keep_within`` before ``now`` (like
                      borg's ``--keep-within``; restic measures from the newest backup instead:
                      here the newest verified and minimum count rules give that protection).
    pinned            ``Manifest.pinned``: never deleted, whatever its state.
    kept until        ``Manifest.keep_until`` in the future: like pinned, until that time
                      (the safety backup a restore takes before replacing a database).
    (held)            ids the caller passes in ``hold``, with its reason: rotation keeps
                      backups of the primary not yet uploaded to an offsite target this way.

Then the size limit: while the good backups kept exceed ``max_total_size`` bytes, the oldest
kept one that is not protected (newest verified, minimum count, pinned, kept until) is
deleted ("over size limit"). If the protected ones alone exceed it, the plan says so in
``warnings`` and deletes nothing more.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta, tzinfo
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pgkeeper.errors import ConfigError
from pgkeeper.manifest import Manifest

if TYPE_CHECKING:
    from pgkeeper.settings import Settings

__all__ = [
    "Decision",
    "Plan",
    "Policy",
    "aware",
    "format_duration",
    "format_size",
    "overrides_from_settings",
    "parse_duration",
    "parse_size",
    "parse_target_overrides",
    "plan",
    "policy_for_target",
    "recorded_at",
]

# -- durations and sizes ------------------------------------------------------------------------

_SECOND = 1
_DURATION_UNITS: dict[str, int] = {
    "s": _SECOND,
    "sec": _SECOND,
    "second": _SECOND,
    "seconds": _SECOND,
    "min": 60,
    "mins": 60,
    "minute": 60,
    "minutes": 60,
    "h": 3600,
    "hour": 3600,
    "hours": 3600,
    "d": 86400,
    "day": 86400,
    "days": 86400,
    "w": 7 * 86400,
    "week": 7 * 86400,
    "weeks": 7 * 86400,
    # A year is 365 days: a timedelta cannot hold calendar years, and a day more or less at the
    # edge of an age limit does not matter for retention (the GFS yearly rule is calendar based).
    "y": 365 * 86400,
    "year": 365 * 86400,
    "years": 365 * 86400,
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]+)")
_DURATION_FULL = re.compile(r"^(?:\s*\d+(?:\.\d+)?\s*[a-z]+)+\s*$")
_DURATION_HINT = "use a number and a unit, e.g. '36h', '7d', '2w', '1y', or combined '1d12h'"


def parse_duration(text: str, setting: str = "duration") -> timedelta:
    """Parse ``36h``, ``7d``, ``2w``, ``1y``, ``90min``, ``1d12h`` (or ``0``) into a timedelta.

    Raises ConfigError, naming ``setting``, for anything else. ``m`` and months are refused:
    ``m`` could mean minutes or months, and months vary in length.
    """
    raw = text.strip().lower() if isinstance(text, str) else ""
    if raw == "0":
        return timedelta(0)
    if _DURATION_FULL.match(raw):
        parts = _DURATION_PART.findall(raw)
        if all(unit in _DURATION_UNITS for _, unit in parts):
            seconds = sum(Decimal(number) * _DURATION_UNITS[unit] for number, unit in parts)
            return timedelta(seconds=float(seconds))
    if re.search(r"\d\s*(m|mo|mon|month|months)\b", raw):
        raise ConfigError(
            f"{setting}={text!r} is ambiguous: months vary in length and 'm' could be minutes "
            "(use '30d', '90min', or BACKUP_KEEP_MONTHLY for calendar months)"
        )
    raise ConfigError(f"{setting}={text!r} is not a duration ({_DURATION_HINT})")


def format_duration(delta: timedelta) -> str:
    """A short exact spelling of ``delta`` that ``parse_duration`` reads back (``7d``, ``36h``).

    Days are preferred to weeks and hours to a single day, as people write them (``24h``).
    """
    total = int(delta.total_seconds())
    if total == 0:
        return "0"
    day = _DURATION_UNITS["d"]
    for unit in ("y", "d", "h", "min"):
        size = _DURATION_UNITS[unit]
        if total % size == 0 and not (unit == "d" and total < 2 * day):
            return f"{total // size}{unit}"
    return f"{total}s"


_SIZE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    # SI units are powers of 1000, IEC units powers of 1024; a bare letter (50G) is read as
    # IEC, as du, docker and most operators' fingers mean it.
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "pb": 1000**5,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
    "pib": 1024**5,
    "k": 1024,
    "m": 1024**2,
    "g": 1024**3,
    "t": 1024**4,
    "p": 1024**5,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int, setting: str = "size") -> int:
    """Parse ``50GB`` (10^9), ``1.5TiB`` (2^40), ``500M`` (2^20) or a byte count into bytes.

    Raises ConfigError, naming ``setting``, for anything else.
    """
    if isinstance(text, int) and not isinstance(text, bool) and text >= 0:
        return text
    match = _SIZE_RE.match(text) if isinstance(text, str) else None
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _SIZE_UNITS:
        raise ConfigError(
            f"{setting}={text!r} is not a size (use a number and a unit, e.g. '50GB', "
            "'1.5TiB', '500MB', or a number of bytes)"
        )
    try:
        return int(Decimal(match.group(1)) * _SIZE_UNITS[unit])
    except InvalidOperation:  # pragma: no cover - the regex only lets decimals through
        raise ConfigError(f"{setting}={text!r} is not a size (use e.g. '50GB')") from None


def format_size(size: int) -> str:
    """Bytes for people: SI when the number is round in it, as limits are written (``50 GB``,
    ``2.4 GB``), else IEC with one decimal (``1.5 GiB``), or ``812 B``."""
    for unit, factor in (("TB", 1000**4), ("GB", 1000**3), ("MB", 1000**2)):
        if size >= factor:
            if size % (factor // 10) == 0:
                text = f"{size / factor:.1f}".removesuffix(".0")
                return f"{text} {unit}"
            break
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


# -- the policy ---------------------------------------------------------------------------------

_PERIODS = ("hourly", "daily", "weekly", "monthly", "yearly")

# Knob names accepted in a per-target override: the setting's name without BACKUP_, lowercase.
_OVERRIDE_KEYS: dict[str, str] = {
    "max_backups": "keep_last",
    "keep_last": "keep_last",
    "keep_hourly": "hourly",
    "keep_daily": "daily",
    "keep_weekly": "weekly",
    "keep_monthly": "monthly",
    "keep_yearly": "yearly",
    "keep_within": "keep_within",
    "max_total_size": "max_total_size",
    "min_backups": "min_backups",
    "failed_grace": "failed_grace",
    "usage_warn_bytes": "usage_warn_bytes",
}
_OFF = {"", "none", "off", "0"}


def _zone(name: str) -> tzinfo:
    if name.upper() in ("UTC", "Z", "ETC/UTC"):
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            f"BACKUP_TIMEZONE={name!r} is not a time zone (use an IANA name like 'UTC' or "
            "'Europe/Paris')"
        ) from None


@dataclass(frozen=True)
class Policy:
    """What to keep on one storage target. Every count may be 0 (that rule is off).

    ``keep_last`` is the seed's ``BACKUP_MAX_BACKUPS``; ``timezone`` draws the GFS period
    boundaries; ``require_verified=False`` (``BACKUP_VERIFY=off``) lets unverified backups count
    as good, since otherwise nothing would ever be; ``usage_warn_bytes`` is not a rule: rotation
    warns when the target holds more than that.
    """

    keep_last: int = 30
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    keep_within: timedelta | None = None
    max_total_size: int | None = None
    min_backups: int = 1
    failed_grace: timedelta = timedelta(hours=24)
    require_verified: bool = True
    timezone: str = "UTC"
    usage_warn_bytes: int | None = None

    def __post_init__(self) -> None:
        for name in ("keep_last", "min_backups", *_PERIODS):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(
                    f"retention {name}={value!r} must be a whole number >= 0 (0 turns it off)"
                )
        if self.keep_within is not None and self.keep_within < timedelta(0):
            raise ConfigError("retention keep_within must not be negative (use e.g. '7d')")
        if self.failed_grace < timedelta(0):
            raise ConfigError("BACKUP_FAILED_GRACE must not be negative (use e.g. '24h')")
        for name in ("max_total_size", "usage_warn_bytes"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"retention {name} must not be negative (use e.g. '50GB')")
        _zone(self.timezone)

    @property
    def tz(self) -> tzinfo:
        return _zone(self.timezone)

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        """The policy the ``BACKUP_*`` retention knobs describe.

        Raises ConfigError when a duration, size or time zone is malformed.
        """
        within = settings.backup_keep_within
        max_size = settings.backup_max_total_size
        warn = settings.backup_usage_warn_bytes
        return cls(
            keep_last=settings.backup_max_backups,
            hourly=settings.backup_keep_hourly,
            daily=settings.backup_keep_daily,
            weekly=settings.backup_keep_weekly,
            monthly=settings.backup_keep_monthly,
            yearly=settings.backup_keep_yearly,
            keep_within=_optional_duration(within, "BACKUP_KEEP_WITHIN"),
            max_total_size=_optional_size(max_size, "BACKUP_MAX_TOTAL_SIZE"),
            min_backups=settings.backup_min_backups,
            failed_grace=parse_duration(settings.backup_failed_grace, "BACKUP_FAILED_GRACE"),
            require_verified=settings.backup_verify != "off",
            timezone=settings.backup_timezone,
            usage_warn_bytes=_optional_size(warn, "BACKUP_USAGE_WARN_BYTES"),
        )

    def with_overrides(self, spec: str, where: str = "retention override") -> Policy:
        """This policy with some knobs replaced: ``"keep_within=7d keep_daily=7"``.

        Keys are the retention settings' names without ``BACKUP_`` (``max_backups``,
        ``keep_hourly`` ... ``keep_yearly``, ``keep_within``, ``max_total_size``,
        ``min_backups``, ``failed_grace``, ``usage_warn_bytes``); pairs are separated by spaces,
        commas or semicolons. ``off`` (or ``0``/``none``) turns an optional limit off.
        Raises ConfigError, naming ``where``, for an unknown key or a malformed value.
        """
        changes: dict[str, Any] = {}
        for item in re.split(r"[\s,;]+", spec.strip()):
            if not item:
                continue
            key, sep, value = item.partition("=")
            key = key.strip().lower().removeprefix("backup_")
            field_name = _OVERRIDE_KEYS.get(key)
            if not sep or field_name is None:
                known = ", ".join(sorted(k for k in _OVERRIDE_KEYS if k != "keep_last"))
                raise ConfigError(
                    f"{where}: {item!r} is not a retention setting (use key=value with a key "
                    f"among {known})"
                )
            label = f"{where}: {key}"
            value = value.strip()
            if field_name == "keep_within":
                changes[field_name] = _optional_duration(value, label)
            elif field_name == "failed_grace":
                changes[field_name] = parse_duration(value, label)
            elif field_name in ("max_total_size", "usage_warn_bytes"):
                changes[field_name] = _optional_size(value, label)
            else:
                if not value.isdigit():
                    raise ConfigError(f"{label}={value!r} must be a whole number >= 0")
                changes[field_name] = int(value)
        return replace(self, **changes)

    def describe(self) -> str:
        """One line for reports: ``last 30, daily 7, within 7d, min 1, grace 24h``."""
        parts = [f"last {self.keep_last}"] if self.keep_last else []
        parts += [f"{p} {getattr(self, p)}" for p in _PERIODS if getattr(self, p)]
        if self.keep_within is not None:
            parts.append(f"within {format_duration(self.keep_within)}")
        if self.max_total_size is not None:
            parts.append(f"max {format_size(self.max_total_size)}")
        parts.append(f"min {self.min_backups}")
        parts.append(f"grace {format_duration(self.failed_grace)}")
        if not self.require_verified:
            parts.append("verification off")
        return ", ".join(parts)


def _optional_duration(value: str | None, setting: str) -> timedelta | None:
    if value is None or value.strip().lower() in _OFF:
        return None
    return parse_duration(value, setting)


def _optional_size(value: str | int | None, setting: str) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in _OFF):
        return None
    return parse_size(value, setting)


def parse_target_overrides(
    value: Mapping[str, str] | str | None, setting: str = "BACKUP_RETENTION_TARGETS"
) -> dict[str, str]:
    """Read per-target overrides: a mapping (or its JSON text) from a target to an override spec.

    A target is a storage URL as listed by ``pgkeeper list`` or a kind (``local``, ``s3``,
    ``gcs``), e.g. ``{"local": "keep_within=7d", "s3": "keep_monthly=12 max_backups=0"}``.
    Raises ConfigError when the JSON is malformed or not an object of strings.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            value = None
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ConfigError(
            f"{setting} must be a JSON object from a target (URL or local/s3/gcs) to overrides, "
            'e.g. {"s3": "keep_monthly=12 keep_within=30d"}'
        )
    return {k.strip().rstrip("/"): v for k, v in value.items()}


def policy_for_target(base: Policy, overrides: Mapping[str, str], url: str, kind: str) -> Policy:
    """The policy of one target: ``base`` with the overrides for its kind, then its URL, applied.

    Raises ConfigError when an override is malformed.
    """
    policy = base
    for key in (kind, url.rstrip("/")):
        if key in overrides:
            policy = policy.with_overrides(overrides[key], f"retention override for {key!r}")
    return policy


# -- the plan -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """Whether one backup is kept, and every rule that decided it (first reason is the main)."""

    backup_id: str
    keep: bool
    reasons: list[str]
    recorded_at: datetime | None = None
    size: int = 0
    state: str = ""
    pinned: bool = False
    group: str = ""

    @property
    def action(self) -> str:
        return "keep" if self.keep else "delete"


@dataclass(frozen=True)
class Plan:
    """The decisions for every backup given to ``plan``, newest first, plus warnings."""

    decisions: list[Decision]
    policy: Policy
    now: datetime
    warnings: list[str] = field(default_factory=list)

    @property
    def keep(self) -> list[str]:
        return [d.backup_id for d in self.decisions if d.keep]

    @property
    def delete(self) -> list[str]:
        return [d.backup_id for d in self.decisions if not d.keep]

    @property
    def kept_size(self) -> int:
        return sum(d.size for d in self.decisions if d.keep)

    def decision(self, backup_id: str) -> Decision:
        """The decision about one backup; raises KeyError when it was not planned."""
        for item in self.decisions:
            if item.backup_id == backup_id:
                return item
        raise KeyError(backup_id)


def aware(when: datetime) -> datetime:
    """``when`` with a time zone: a naive time is taken as UTC.

    Manifests written by pgkeeper carry UTC offsets; a naive time (a hand-written or imported
    manifest) is read as UTC rather than in the local zone of whoever runs rotation.
    """
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def recorded_at(manifest: Manifest) -> datetime:
    """The time that orders backups: the backup's own recorded start, never a storage time."""
    return aware(manifest.started_at)


def _sort_key(m: Manifest) -> tuple[datetime, datetime, str]:
    # The id only breaks exact ties, to make the plan deterministic; it never orders backups.
    return (recorded_at(m), aware(m.finished_at), m.id)


def group_of(m: Manifest) -> str:
    """Backups of one database on one server; base backups (database '*') are a group of their
    own beside a server's globals dumps (database '*' too): neither may satisfy the other's
    rules."""
    group = f"{m.database}@{m.server}" if m.server else m.database
    return f"base {group}" if m.kind == "base" else group


_BUCKETS: dict[str, Callable[[datetime], tuple[int, ...]]] = {
    "hourly": lambda t: (t.year, t.month, t.day, t.hour),
    "daily": lambda t: (t.year, t.month, t.day),
    "weekly": lambda t: tuple(t.isocalendar())[:2],
    "monthly": lambda t: (t.year, t.month),
    "yearly": lambda t: (t.year,),
}


def _gfs(good: Sequence[Manifest], rule: str, count: int, tz: tzinfo) -> dict[str, str]:
    """restic's bucket walk for one ``--keep-<rule> count`` over ``good`` (newest first)."""
    kept: dict[str, str] = {}
    last: tuple[int, ...] | None = None
    bucket = _BUCKETS[rule]
    for index, manifest in enumerate(good):
        if len(kept) >= count:
            break
        value = bucket(recorded_at(manifest).astimezone(tz))
        oldest = index == len(good) - 1
        if value != last or oldest:
            label = f"{rule} {len(kept) + 1}/{count}"
            kept[manifest.id] = label if value != last else f"oldest {label}"
            last = value
    return kept


def _is_good(m: Manifest, policy: Policy) -> bool:
    if m.verification_failed:
        return False
    return m.verified or not policy.require_verified


def plan(
    backups: Sequence[Manifest],
    policy: Policy,
    now: datetime,
    hold: Mapping[str, str] | None = None,
    group_policy: Callable[[str], Policy | None] | None = None,
) -> Plan:
    """Decide, for every backup of one target, whether to keep it and why (see module docstring).

    ``hold`` maps ids the caller needs kept to the reason (rotation holds backups of the primary
    target not yet uploaded offsite). Like every keep rule it applies to good backups only and
    yields to the size limit. ``group_policy`` gives a group (``database@server``) a policy of
    its own (a fleet database's overrides; None: ``policy``) for every rule but the size limit,
    which is about the target's disk and stays ``policy``'s. Pure: reads nothing but its
    arguments. Raises nothing for any list of manifests (an empty list gives an empty plan).
    """
    hold = hold or {}
    now = aware(now)
    target_policy = policy
    ordered = sorted(backups, key=_sort_key, reverse=True)
    reasons: dict[int, list[str]] = {i: [] for i in range(len(ordered))}
    deletes: dict[int, str] = {}
    protected: set[int] = set()
    good_kept: list[int] = []  # indexes into ordered, of good backups the rules keep
    warnings: list[str] = []

    groups: dict[str, list[int]] = {}
    for index, manifest in enumerate(ordered):
        groups.setdefault(group_of(manifest), []).append(index)

    for group, members in groups.items():
        policy = (group_policy(group) if group_policy else None) or target_policy
        tz = policy.tz
        good = [i for i in members if _is_good(ordered[i], policy)]
        good_set = set(good)
        good_manifests = [ordered[i] for i in good]
        by_id_index = {ordered[i].id: i for i in good}
        # With verification off the newest good backup may be unverified; the newest verified
        # one (verified by hand) is protected as well, so invariant 1 holds in every mode.
        newest_verified = next((i for i in good if ordered[i].verified), None)
        for rank, index in enumerate(good):
            why = reasons[index]
            if index == newest_verified:
                why.append("newest verified")
                protected.add(index)
            elif rank == 0:
                why.append("newest")
                protected.add(index)
            if rank < policy.min_backups:
                why.append(f"minimum count {rank + 1}/{policy.min_backups}")
                protected.add(index)
            if rank < policy.keep_last:
                why.append(f"last {rank + 1}/{policy.keep_last}")
        for rule in _PERIODS:
            count = getattr(policy, rule)
            if count:
                for backup_id, label in _gfs(good_manifests, rule, count, tz).items():
                    reasons[by_id_index[backup_id]].append(label)
        if policy.keep_within is not None:
            cutoff = now - policy.keep_within
            label = f"within {format_duration(policy.keep_within)}"
            for index in good:
                if recorded_at(ordered[index]) >= cutoff:
                    reasons[index].append(label)
        for index in good:
            if ordered[index].id in hold:
                reasons[index].append(hold[ordered[index].id])

        for index in members:
            manifest = ordered[index]
            held = manifest.pinned
            if manifest.pinned:
                reasons[index].append("pinned")
                protected.add(index)
            if manifest.keep_until is not None and aware(manifest.keep_until) > now:
                until = aware(manifest.keep_until).astimezone(UTC)
                reasons[index].append(f"kept until {until:%Y-%m-%d %H:%M}Z")
                protected.add(index)
                held = True
            if index in good_set:
                if reasons[index]:
                    good_kept.append(index)
                else:
                    deletes[index] = "no rule keeps it"
            elif manifest.verification_failed:
                since = aware(manifest.failed_at or manifest.finished_at)
                what = "failed verification"
                if manifest.restore_failed:
                    what = "failed its restore test"
                if now - since <= policy.failed_grace:
                    reasons[index].append(f"{what}, in grace")
                elif not held:
                    deletes[index] = what
            elif now - aware(manifest.finished_at) <= policy.failed_grace:
                reasons[index].append("unverified, in grace")
            elif not held:
                deletes[index] = "unverified past grace"

        if not good:
            word = "verified " if policy.require_verified else ""
            warnings.append(
                f"no {word}backup of {group} on this target: nothing here is known to restore "
                "(check the backup and verify runs)"
            )
        elif len(good) < policy.min_backups:
            warnings.append(
                f"only {len(good)} good backups of {group}, fewer than the minimum of "
                f"{policy.min_backups}: all of them are kept"
            )

    future = [m for m in ordered if recorded_at(m) > now + timedelta(minutes=5)]
    for manifest in future:
        warnings.append(
            f"backup {manifest.id} is recorded at {recorded_at(manifest).isoformat()}, "
            "in the future (clock skew on the machine that made it?): it sorts as the newest"
        )

    if target_policy.max_total_size is not None:
        _apply_size_limit(
            ordered, good_kept, protected, reasons, deletes, target_policy, warnings
        )

    decisions = [
        Decision(
            backup_id=m.id,
            keep=i not in deletes,
            reasons=[deletes[i]] if i in deletes else reasons[i],
            recorded_at=recorded_at(m),
            size=m.size,
            state=m.state,
            pinned=m.pinned,
            group=group_of(m),
        )
        for i, m in enumerate(ordered)
    ]
    return Plan(decisions=decisions, policy=target_policy, now=now, warnings=warnings)


def _apply_size_limit(
    ordered: Sequence[Manifest],
    good_kept: Iterable[int],
    protected: set[int],
    reasons: dict[int, list[str]],
    deletes: dict[int, str],
    policy: Policy,
    warnings: list[str],
) -> None:
    """Delete kept good backups, oldest first, until they fit ``max_total_size``.

    Only good backups count toward the limit: unverified and failed ones are transient (gone
    after the grace period), and letting them count would let a bad backup push a good one out.
    """
    limit = policy.max_total_size
    if limit is None:
        return
    kept = sorted(good_kept, key=lambda i: _sort_key(ordered[i]))  # oldest first
    total = sum(ordered[i].size for i in kept)
    for index in kept:
        if total <= limit:
            break
        if index in protected:
            continue
        deletes[index] = "over size limit (was: " + ", ".join(reasons[index]) + ")"
        total -= ordered[index].size
    if total > limit:
        warnings.append(
            f"the protected backups (newest verified, minimum count, pinned, kept until) use "
            f"{format_size(total)}, over the size limit of {format_size(limit)}: "
            "raise BACKUP_MAX_TOTAL_SIZE, unpin, or lower BACKUP_MIN_BACKUPS"
        )


def overrides_from_settings(settings: Settings) -> dict[str, str]:
    """The per-target overrides configured in ``settings`` (empty until the knob exists).

    Reads ``BACKUP_RETENTION_TARGETS`` defensively so this module works before the setting is
    added. Raises ConfigError when it is malformed.
    """
    raw: object = getattr(settings, "backup_retention_targets", None)
    if raw is None or isinstance(raw, str | Mapping):
        return parse_target_overrides(raw)
    raise ConfigError(
        "BACKUP_RETENTION_TARGETS must be a JSON object "
        "(see 'Per-target policies' in docs/retention.md)"
    )
