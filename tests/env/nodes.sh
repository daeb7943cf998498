#!/usr/bin/env bash
# Prints the fake nodes of the test environment as a YAML list for `kubectl apply`.
# kwok manages the nodes annotated `kwok.x-k8s.io/node: fake`; Node status (capacity,
# allocatable) may be set on create, which is how the pools get their GPUs.
set -euo pipefail

# node NAME POOL ACCELERATOR GPU_RESOURCE GPU_COUNT [EXTRA_LABEL=VALUE...]
node() {
  local name=$1 pool=$2 accelerator=$3 gpu_resource=$4 gpu_count=$5
  shift 5
  cat <<EOF
- apiVersion: v1
  kind: Node
  metadata:
    name: $name
    annotations:
      kwok.x-k8s.io/node: fake
      node.alpha.kubernetes.io/ttl: "0"
    labels:
      type: kwok
      kubernetes.io/arch: amd64
      kubernetes.io/os: linux
      kubernetes.io/hostname: $name
      agent-bus.io/pool: $pool
EOF
  [[ -n $accelerator ]] && echo "      accelerator: $accelerator"
  [[ -n $accelerator ]] && echo "      nvidia.com/gpu.present: \"true\""
  local label
  for label in "$@"; do echo "      ${label%%=*}: \"${label#*=}\""; done
  echo "  spec:"
  if [[ -n $accelerator ]]; then
    cat <<EOF
    taints:
    - key: nvidia.com/gpu
      value: "true"
      effect: NoSchedule
EOF
  fi
  local field
  echo "  status:"
  for field in capacity allocatable; do
    echo "    $field:"
    echo "      cpu: \"64\""
    echo "      memory: 512Gi"
    echo "      ephemeral-storage: 1Ti"
    echo "      pods: \"110\""
    if [[ -n $gpu_resource ]]; then echo "      $gpu_resource: \"$gpu_count\""; fi
  done
}

echo "apiVersion: v1"
echo "kind: List"
echo "items:"
for i in 0 1 2; do node "cpu-$i" cpu "" "" ""; done
for i in 0 1; do node "gpu-v100-$i" gpu-v100 nvidia-tesla-v100 nvidia.com/gpu 8; done
for i in 0 1; do node "gpu-a100-$i" gpu-a100 nvidia-tesla-a100 nvidia.com/gpu 8; done
node gpu-h100-0 gpu-h100 nvidia-h100-80gb nvidia.com/gpu 8
node gpu-a100-mig-0 gpu-a100-mig nvidia-tesla-a100 nvidia.com/mig-1g.10gb 7 \
  nvidia.com/mig.strategy=mixed nvidia.com/mig.config=all-1g.10gb
