#!/bin/sh
# pocketlora-edge-firewall SUBNET PORTS -- COMMAND [ARGS...]
#
# For a container on both the devices' network and the backend (the Ray ingress nodes in
# docker-compose.yml): drop every connection from SUBNET, the devices' network, except to the
# TCP PORTS (comma-separated: the front ends' gRPC port), then run COMMAND as the pocketlora
# user with no capabilities left. Why: Ray binds its raylet, object manager, GCS client and
# worker ports on every interface, whatever --node-ip-address says (Ray 2.60), so a node the
# devices can reach exposes an unauthenticated Ray cluster to them. This is what the Kubernetes
# NetworkPolicy (deploy/kubernetes/) does there. Needs CAP_NET_ADMIN and root to start.
set -eu
if [ "$#" -lt 4 ] || [ "$3" != "--" ]; then
  echo "usage: pocketlora-edge-firewall SUBNET PORT[,PORT...] -- COMMAND [ARGS...]" >&2
  exit 2
fi
subnet=$1
ports=$2
shift 3
case "$ports" in
  *[!0-9,]* | "" | ,* | *, | *,,*) echo "pocketlora-edge-firewall: bad port list: $ports" >&2; exit 2 ;;
esac
# Replies to connections this node opened, and new ones to the open ports; nothing else.
iptables -w -A INPUT -s "$subnet" -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
iptables -w -A INPUT -s "$subnet" -p tcp -m multiport --dports "$ports" -j ACCEPT
iptables -w -A INPUT -s "$subnet" -j DROP
exec setpriv --reuid=pocketlora --regid=pocketlora --init-groups --inh-caps=-all --bounding-set=-all -- "$@"
