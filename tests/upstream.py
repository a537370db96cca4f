"""The tests' name for the fake OpenAI upstream (gateway/fake_upstream.py: behaviours and records;
its answers are gateway/fake_answers.py)."""

from gateway.fake_upstream import FakeUpstream as MockUpstream
from gateway.fake_upstream import RecordedRequest

__all__ = ["MockUpstream", "RecordedRequest"]
