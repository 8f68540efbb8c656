#!/usr/bin/env bash
# The linearisation recipe on SmolLM2-135M-Instruct (see examples/smollm2_linearise.py), after
# examples/smollm2_setup.sh. Extra arguments go to the Python script.
source "$(dirname "${BASH_SOURCE[0]}")/smollm2_setup.sh"
exec "$PY" examples/smollm2_linearise.py "$@"
