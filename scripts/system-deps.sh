#!/usr/bin/env bash
# Debian packages the tests start for real, on loopback only: Orthanc (a PACS), dcmtk (storescu,
# echoscu), dicom3tools (dciodvfy), Chromium + ChromeDriver (the kiosk page in a real browser).
# Idempotent; needs root (CI runs as root). Without root or apt it says what is missing and the
# tests that need those programs skip with that reason.
set -uo pipefail
PACKAGES=(orthanc dcmtk dicom3tools chromium chromium-driver)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "[system-deps] ok: ${PACKAGES[*]}"
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "[system-deps] cannot install ${missing[*]} (needs root and apt-get); the tests that use them will skip" >&2
  exit 0
fi
echo "[system-deps] installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
# --no-install-recommends keeps Orthanc's optional plugins and Chromium's extras off the box.
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# Debian starts Orthanc as a system service on 4242/8042 when it can; the tests start their own
# instances on free ports with their own configuration, so stop the packaged one if it runs.
if command -v service >/dev/null; then service orthanc stop >/dev/null 2>&1 || true; fi
echo "[system-deps] ok: ${PACKAGES[*]}"
