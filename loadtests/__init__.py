"""Load tests: a fake OpenAI upstream, locust journeys and a smoke run (see README.md)."""
