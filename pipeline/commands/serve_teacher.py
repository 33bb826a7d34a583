"""``pipeline serve-teacher``: serve a local transformers model as an OpenAI-compatible teacher.

The command binds the listening socket itself before it logs the start line, so with
``--port 0`` the line shows the port actually chosen.
"""

from __future__ import annotations

import errno
import logging
import signal
import socket

import click

from pipeline.local_teacher import PLAIN_TEMPLATE_DOC
from pipeline.model_paths import device_problem, model_source_problem

logger = logging.getLogger(__name__)


def _bind_fix(error: OSError) -> str:
    """Return which flag fixes a failed bind: --host for addresses, --port otherwise."""
    if isinstance(error, socket.gaierror) or error.errno == errno.EADDRNOTAVAIL:
        return "pass an address of this machine as --host, such as 127.0.0.1"
    return "pick another --port"


@click.command(
    "serve-teacher",
    help=f"""Serve MODEL over HTTP with the OpenAI completions and chat completions APIs.

MODEL is a transformers model directory or a Hugging Face hub id. The server responds to
GET /health, GET /v1/models, POST /v1/completions and POST /v1/chat/completions, and
returns logprobs with up to 20 alternatives per token. Logprobs are the model's
log-softmax at temperature 1 over the whole vocabulary, whatever the sampling settings.
temperature 0 decodes greedily, and the same seed gives the same output. A token
whose bytes are not valid UTF-8 on their own (one byte of a multi-byte character) has
the text form bytes:\\xNN. The chat API's bytes field carries every token's exact
bytes.

Chat messages are rendered with the tokenizer's chat template. {PLAIN_TEMPLATE_DOC}

The server runs until Ctrl-C or SIGTERM, then finishes the requests in progress and
exits with status 0.
""",
    epilog="""\b
Example:
  HF_HUB_OFFLINE=1 pipeline serve-teacher ../shared/models/stories260k --port 8400 &
  curl -s http://127.0.0.1:8400/v1/completions -H 'Content-Type: application/json' \\
      -d '{{"model": "stories260k", "prompt": "Once upon a time", "max_tokens": 20,
           "temperature": 0, "logprobs": 5}}'
""",
)
@click.argument("model")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8400,
    show_default=True,
    help="TCP port to listen on; 0 picks a free port and logs it.",
)
@click.option(
    "--served-name",
    default=None,
    help="Model name that clients send in 'model'. Default: the last component of MODEL.",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="Device to run the model on: auto (cuda when available, else cpu), cpu, cuda or cuda:N.",
)
@click.option(
    "--dtype",
    type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
    default="auto",
    show_default=True,
    help="Weight dtype. auto: the checkpoint's dtype on a GPU, float32 on a CPU.",
)
def command(model: str, host: str, port: int, served_name: str | None, device: str, dtype: str) -> None:
    # Imported here so that `pipeline --help` does not import torch.
    from pipeline.local_teacher import LoadOptions, TeacherModel
    from pipeline.serve import ServeConfig, base_url, bind_socket, build_server, create_app

    config = ServeConfig(model=model, host=host, port=port, served_name=served_name, device=device, dtype=dtype)
    name = config.resolved_served_name()
    problems = [p for p in (model_source_problem(model, "MODEL"), device_problem(device)) if p]
    if problems:
        raise click.UsageError("; ".join(problems))

    try:
        teacher = TeacherModel.load(config.model, LoadOptions(device=config.device, dtype=config.dtype))
    except (OSError, ValueError, RuntimeError) as error:
        raise click.UsageError(f"cannot load model {model!r}: {error}") from error

    try:
        sock = bind_socket(config.host, config.port)
    except OSError as error:
        raise click.UsageError(
            f"cannot listen on {config.host}:{config.port}: {error.strerror or error};"
            f" {_bind_fix(error)}"
        ) from error

    server = build_server(create_app(teacher, name))
    # The start line must be visible at the CLI's default WARNING level too.
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.info(
        "serving model %s as %r on %s (device %s, context %d tokens)",
        model,
        name,
        base_url(sock),
        teacher.device,
        teacher.max_context,
    )
    with sock:
        server.run(sockets=[sock])

    reason = signal.Signals(server.stop_signal).name if server.stop_signal else "shutdown"
    click.echo(f"serve-teacher: stopped after {reason}", err=True)
