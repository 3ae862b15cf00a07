"""The exception type for bad data (defined with the other user errors in embedcore.errors), and
the counter used when skipping it."""
from collections import Counter

from embedcore.errors import DataError

__all__ = ["DataError", "SkipCounter"]


class SkipCounter:
    """Counts skipped examples by reason and keeps the first message of each reason."""

    def __init__(self):
        self.counts = Counter()
        self.first_message = {}

    def add(self, err: DataError) -> None:
        """Record one skipped example."""
        self.counts[err.reason] += 1
        self.first_message.setdefault(err.reason, str(err))

    def as_dict(self) -> dict:
        """reason -> count, sorted by reason (stable for logs and tests)."""
        return {k: self.counts[k] for k in sorted(self.counts)}

    def summary(self) -> str:
        """One line: ``skipped 3 bad examples (empty_positive: 2, malformed_json: 1)`` or ``''``."""
        total = sum(self.counts.values())
        if not total:
            return ""
        parts = ", ".join(f"{k}: {v}" for k, v in self.as_dict().items())
        return f"skipped {total} bad example{'s' if total != 1 else ''} ({parts})"
