"""The tests' name for the fake OpenAI upstream (gateway/fake_upstream.py: routes, behaviours, records)."""

from gateway.fake_upstream import FakeUpstream as MockUpstream
from gateway.fake_upstream import RecordedRequest

__all__ = ["MockUpstream", "RecordedRequest"]
