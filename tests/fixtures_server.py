"""The real teacher server on 127.0.0.1, run in a background thread for tests.

Use the session fixture by importing it into a test module::

    from tests.fixtures_server import teacher_server_url  # noqa: F401

    def test_something(teacher_server_url):
        client = openai.OpenAI(base_url=teacher_server_url, api_key="test")

``teacher_server_url`` is ``http://127.0.0.1:PORT/v1`` for the tiny model served as
``stories260k``. For another model or name, use :func:`running_teacher_server`
directly. The model is loaded once per process and shared by every server started
here, so a second server costs only the start of uvicorn (well under a second).
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.local_teacher import LoadOptions, SamplingParams, TeacherModel
from pipeline.serve import base_url, bind_socket, build_server, create_app, default_served_name

START_TIMEOUT_S = 30.0


@functools.lru_cache(maxsize=None)
def load_teacher(model_dir: str) -> TeacherModel:
    """Load a model on the CPU once per process, and warm it up with a short generation."""
    teacher = TeacherModel.load(model_dir, LoadOptions(device="cpu", dtype="float32"))
    # The first forward passes pay torch's one-time setup; pay it here, not in a test.
    teacher.generate(teacher.encode_prompt("Once"), SamplingParams(max_tokens=8, temperature=0))
    return teacher


@contextlib.contextmanager
def running_teacher_server(model_dir: str | Path, served_name: str | None = None) -> Iterator[str]:
    """Serve ``model_dir`` on a free port of 127.0.0.1 and yield the base URL ending in ``/v1``."""
    teacher = load_teacher(str(model_dir))
    name = served_name or default_served_name(str(model_dir))
    server = build_server(create_app(teacher, name))
    sock = bind_socket("127.0.0.1", 0)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="teacher-server", daemon=True
    )
    thread.start()
    try:
        _wait_until_started(server, thread)
        yield base_url(sock)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def _wait_until_started(server, thread: threading.Thread) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("teacher server thread exited before it started; see the log above")
        if time.monotonic() > deadline:
            raise RuntimeError(f"teacher server did not start within {START_TIMEOUT_S} s")
        time.sleep(0.01)


@pytest.fixture(scope="session")
def teacher_server_url(model_dir: Path) -> Iterator[str]:
    """Base URL of the tiny model served as ``stories260k`` for the whole test session."""
    with running_teacher_server(model_dir) as url:
        yield url
