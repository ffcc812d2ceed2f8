"""The worker's half of the drain on SIGTERM (handler/serving/drain.py): the file serve.sh writes, read."""

from __future__ import annotations

import time

import pytest

from handler.serving.drain import DRAIN_FILE_ENV, Drain


@pytest.mark.parametrize("content, draining, past", [
    (None, False, False),  # no file: serving
    ("{deadline_in_10s}", True, False),  # draining: new requests refused, open ones go on
    ("{deadline_passed}", True, True),  # past the deadline: open requests end now
    ("not a number", True, True),  # an unreadable deadline ends at once rather than never
])
def test_drain_file_states(tmp_path, content, draining, past):
    path = tmp_path / "draining"
    if content is not None:
        path.write_text(content.format(deadline_in_10s=time.time() + 10, deadline_passed=time.time() - 1))
    drain = Drain(path)
    assert (drain.draining(), drain.past_deadline()) == (draining, past)


def test_no_drain_file_configured_never_drains(monkeypatch):
    monkeypatch.delenv(DRAIN_FILE_ENV, raising=False)
    drain = Drain.from_env()
    assert drain.path is None and not drain.draining() and not drain.past_deadline()


def test_the_file_is_seen_once_written_and_looked_at_no_more_than_every_check(tmp_path):
    path = tmp_path / "draining"
    drain = Drain(path)
    assert not drain.draining(now=100.0)
    path.write_text(str(time.time() + 5))
    assert not drain.draining(now=100.05), "looked again within CHECK_EVERY_S"
    assert drain.draining(now=100.2)


@pytest.mark.parametrize("draining, open_jobs, refused, idle", [
    (False, 0, False, False),  # not draining: never idle
    (True, 2, False, False),  # jobs still open
    (True, 0, True, False),  # this call brought a generation request: the frontend may queue more
    (True, 0, False, True),  # nothing held, nothing new: serve.sh may stop TorchServe
])
def test_idle_marker_only_when_nothing_is_held(tmp_path, draining, open_jobs, refused, idle):
    path = tmp_path / "draining"
    if draining:
        path.write_text(str(time.time() + 5))
    drain = Drain(path)
    drain.draining()
    drain.after_call(open_jobs, refused)
    assert (tmp_path / "draining.idle").exists() == idle
