#!/usr/bin/env bash
# Training on a Cloud TPU VM slice (v4-32, v5e-16, ...): the same experiments/train.py on every worker of the
# slice, started with `gcloud compute tpus tpu-vm ssh --worker=all`. FLAXFORMER_DISTRIBUTED=1 makes train.py
# call jax.distributed.initialize() with no arguments: JAX finds the slice's hosts from the TPU metadata.
#
#   launch/tpu_vm.sh TPU_NAME ZONE setup                       # once: clone/copy the checkout, install jax[tpu]
#   launch/tpu_vm.sh TPU_NAME ZONE train --config=experiments/configs/wmt14_ende.py:base --workdir=gs://BUCKET/runs/wmt
#   launch/tpu_vm.sh TPU_NAME ZONE logs                        # tail the log of worker 0
#   launch/tpu_vm.sh TPU_NAME ZONE stop                        # SIGTERM: every worker checkpoints and exits
#
# The workdir must be shared by all workers (a gs:// bucket); so must --config.data_dir (or each worker
# builds the same dataset locally). Rerunning `train` with the same flags resumes from the latest checkpoint.
set -euo pipefail
if [ $# -lt 3 ]; then
  sed -n '2,14p' "$0"; exit 2
fi
TPU="$1"; ZONE="$2"; ACTION="$3"; shift 3
REPO_DIR="${REPO_DIR:-flaxformer_lite}"
ssh_all() { gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="$1"; }
case "$ACTION" in
  setup)
    # Copies this checkout (without runs or the venv) to every worker and installs it with TPU jax.
    tar czf /tmp/flaxformer_lite.tgz --exclude=.venv --exclude=workdir --exclude=.git -C "$(dirname "$0")/.." .
    gcloud compute tpus tpu-vm scp /tmp/flaxformer_lite.tgz "$TPU":/tmp/ --zone="$ZONE" --worker=all
    ssh_all "mkdir -p $REPO_DIR && tar xzf /tmp/flaxformer_lite.tgz -C $REPO_DIR && cd $REPO_DIR && \
      python3 -m venv .venv && .venv/bin/pip install -q -e '.[gcs]' 'jax[tpu]'"
    ;;
  train)
    ARGS=$(printf ' %q' "$@")
    ssh_all "cd $REPO_DIR && FLAXFORMER_DISTRIBUTED=1 nohup .venv/bin/python experiments/train.py$ARGS > train.log 2>&1 &"
    echo "started on all workers of $TPU; logs: $0 $TPU $ZONE logs"
    ;;
  logs)
    gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=0 --command="tail -f $REPO_DIR/train.log"
    ;;
  stop)
    ssh_all "pkill -TERM -f '[e]xperiments/train.py' || true"
    ;;
  *)
    echo "unknown action $ACTION (setup | train | logs | stop)"; exit 2
    ;;
esac
