#!/usr/bin/env bash
# Makes netsieve the only NetworkPolicy enforcer of a kind cluster that uses kindnet.
# kindnet bundles its own enforcer since kind v0.24, on by default; kindnetd's
# --network-policy=false turns it off. Idempotent. Usage: disable-kindnet-policy.sh [context]
set -euo pipefail
ctx=${1:-kind-netsieve}
args=$(kubectl --context "$ctx" -n kube-system get daemonset kindnet \
  -o jsonpath='{.spec.template.spec.containers[0].args}')
if [[ "$args" == *"--network-policy=false"* ]]; then
  echo "kindnet policy enforcement already off"; exit 0
fi
if [[ -z "$args" ]]; then
  patch='[{"op":"add","path":"/spec/template/spec/containers/0/args","value":["--network-policy=false"]}]'
else
  patch='[{"op":"add","path":"/spec/template/spec/containers/0/args/-","value":"--network-policy=false"}]'
fi
kubectl --context "$ctx" -n kube-system patch daemonset kindnet --type json -p "$patch"
kubectl --context "$ctx" -n kube-system rollout status daemonset kindnet --timeout 120s
