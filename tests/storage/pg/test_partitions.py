from __future__ import annotations

from datetime import date

from storage.pg.partitions import months_to_cover, next_month, partition_name


def test_partition_names() -> None:
    assert partition_name("message", date(2026, 11, 1)) == "message_y2026m11"
    assert partition_name("message_recipient", date(2027, 1, 1)) == "message_recipient_y2027m01"


def test_next_month_wraps_the_year() -> None:
    assert next_month(date(2026, 12, 15)) == date(2027, 1, 1)
    assert next_month(date(2026, 1, 31)) == date(2026, 2, 1)


def test_current_month_and_three_ahead() -> None:
    assert months_to_cover(date(2026, 11, 22)) == [
        date(2026, 11, 1),
        date(2026, 12, 1),
        date(2027, 1, 1),
        date(2027, 2, 1),
    ]
