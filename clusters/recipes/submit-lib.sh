# Sourced by the recipes' submit.sh: `submit ID [ray job submit options] -- ENTRYPOINT...` submits one
# job with the GPU runtime_env and waits for it (ray job submit exits non-zero when the job fails).
# DRY_RUN=1 prints each entrypoint instead (tests/test_clusters.py checks every one against the CLI).
set -euo pipefail
ENV=clusters/runtime_env/gpu.yaml
if [[ -z "${DRY_RUN:-}" ]]; then
  : "${RAY_ADDRESS:?set RAY_ADDRESS to the dashboard address of the cluster, e.g. http://127.0.0.1:8265}"
fi

submit() {
  local id=$1; shift
  if [[ -n "${DRY_RUN:-}" ]]; then
    printf '%q ' "$id" "$@"; echo
  else
    ray job submit --runtime-env "$ENV" --submission-id "$id" "$@"
  fi
}
