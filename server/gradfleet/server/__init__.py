"""gradfleet parameter server.

Public API::

    from gradfleet.server import ParameterServer, ServerConfig, serve, main

    with serve(host="127.0.0.1", port=0, checkpoint_dir=None, token=None) as server:
        server.port, server.address      # e.g. 54321, "127.0.0.1:54321"

    server = ParameterServer(ServerConfig(port=50051, checkpoint_dir="ckpt")).start()
    server.stop(grace=5.0)               # NOT_SERVING, drain, final checkpoint

    main(["--port", "50051"])            # the `gradfleet server` command; returns 0

`ServerConfig` fields (all optional): host, port, checkpoint_dir, checkpoint_every,
tls_cert, tls_key, tls_client_ca, token, metrics_port, max_job_bytes,
max_message_bytes, max_concurrent_streams, chunk_bytes, receive_budget_bytes, grace.

Status codes (each with one sentence in the details):
- NOT_FOUND: unknown (or deleted) job.
- INVALID_ARGUMENT: bad job config or JSON; gradient with a wrong dtype, layout or byte
  count, chunks that overlap, leave holes or are misaligned, NaN/Inf values or loss,
  negative rows, worker id outside 0..N-1; a malformed push header.
- FAILED_PRECONDITION: async gradient staler than the bound; a push for a step ahead of
  the job's version; a push to a stopped job; a pull of a version past total_steps or of
  a job stopped before reaching it; CheckpointJob without a checkpoint directory.
- RESOURCE_EXHAUSTED: model over max_job_bytes, message over max_message_bytes, more
  than max_concurrent_streams pulls/pushes at once.
- UNAUTHENTICATED: missing or wrong bearer token (health checks stay open).
- ALREADY_EXISTS: an existing job id with different settings.
- DEADLINE_EXCEEDED: min_version not reached within the call's deadline.
- UNAVAILABLE: the server is shutting down (clients retry).
Late sync gradients (step already closed) and retries are not errors: the PushAck says
DROPPED_LATE or DUPLICATE. Every rejection leaves weights and version untouched and is
counted in the job's counters and the Prometheus metrics.
"""

from gradfleet.server.app import ParameterServer, ServerConfig, serve
from gradfleet.server.cli import main

__all__ = ["ParameterServer", "ServerConfig", "main", "serve"]
