#!/usr/bin/env bash
# SmolLM2-135M-Instruct into LASP (see examples/smollm2_import.py), after examples/smollm2_setup.sh.
# Extra arguments go to the Python script.
source "$(dirname "${BASH_SOURCE[0]}")/smollm2_setup.sh"
exec "$PY" examples/smollm2_import.py "$@"
