#!/usr/bin/env bash
# Regenerate the committed protobuf/gRPC code. CI runs this, then `git diff --exit-code`.
# Usage: scripts/gen_protos.sh   (PYTHON=/path/to/python to pick the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
"${PYTHON:-python}" -m grpc_tools.protoc -Iproto \
  --python_out=proto --pyi_out=proto --grpc_python_out=proto \
  proto/gradfleet/proto/v1/parameter_server.proto
