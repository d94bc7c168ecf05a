"""Opening hours from a content package: is the site open at a given UTC instant?

``hours.week`` lists open intervals ``[weekday (0 = Monday), start_minute, end_minute)`` in
the site's local time; ``hours.tz`` lists ``[from_utc_ms, utc_offset_minutes]`` transitions
in ascending order (the fleet computes them from the site's zone, so the terminal needs no
zone database).  An instant before the first transition uses the first offset.
"""

DAY_MS = 86400000
EPOCH_WEEKDAY = 3  # 1970-01-01 was a Thursday (Monday = 0)


def offset_minutes(tz, utc_ms):
    """The UTC offset in minutes in force at ``utc_ms`` according to the ``tz`` list."""
    offset = tz[0][1]
    for start, minutes in tz:
        if start > utc_ms:
            break
        offset = minutes
    return offset


def local_week_minute(tz, utc_ms):
    """``(weekday, minute of the day)`` in local time at ``utc_ms``."""
    local = utc_ms + offset_minutes(tz, utc_ms) * 60000
    days = local // DAY_MS
    return (days + EPOCH_WEEKDAY) % 7, (local - days * DAY_MS) // 60000


def is_open(hours, utc_ms):
    """True when ``utc_ms`` lies in an open interval; always open without ``hours`` or
    while the wall clock is unknown (``utc_ms`` None): a visitor must never face a dark
    screen because the clock has not been set yet."""
    if hours is None or utc_ms is None:
        return True
    weekday, minute = local_week_minute(hours["tz"], utc_ms)
    return any(day == weekday and start <= minute < end for day, start, end in hours["week"])
