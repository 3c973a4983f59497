#!/usr/bin/env bash
# Make a private CA and the certificates a TLS deployment needs, with openssl:
#   bash scripts/make_tls.sh DIR SERVER_NAME [DEVICE_ID...]
# writes DIR/ca.crt + ca.key (keep ca.key offline once done), DIR/server.crt + server.key for the
# orchestrator (subjectAltName DNS:SERVER_NAME, DNS:localhost, IP:127.0.0.1), and for each device
# DIR/DEVICE_ID.crt + .key naming the device as CN and as URI pocketlora-device:DEVICE_ID, which
# is what binds a device certificate to its id under mutual TLS. Existing files are kept.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 DIR SERVER_NAME [DEVICE_ID...]" >&2
  exit 2
fi
dir=$1
server=$2
shift 2
mkdir -p "$dir"
umask 077
newkey=(-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes)

if [ ! -f "$dir/ca.crt" ]; then
  openssl req -x509 "${newkey[@]}" -days 1825 -keyout "$dir/ca.key" -out "$dir/ca.crt" \
    -subj "/CN=PocketLoRA CA" -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
fi

# leaf NAME CN EXTENSIONS: a key and a certificate signed by the CA, valid for a year.
leaf() {
  local name=$1 cn=$2 ext=$3
  [ -f "$dir/$name.crt" ] && return
  openssl req -new "${newkey[@]}" -keyout "$dir/$name.key" -out "$dir/$name.csr" -subj "/CN=$cn" 2>/dev/null
  printf '%b' "$ext" > "$dir/$name.ext"
  openssl x509 -req -in "$dir/$name.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
    -days 365 -out "$dir/$name.crt" -extfile "$dir/$name.ext" 2>/dev/null
  rm -f "$dir/$name.csr" "$dir/$name.ext"
  echo "$dir/$name.crt"
}

leaf server "$server" "subjectAltName=DNS:$server,DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth"
for device in "$@"; do
  leaf "$device" "$device" "subjectAltName=URI:pocketlora-device:$device\nextendedKeyUsage=clientAuth"
done
chmod 644 "$dir"/*.crt
