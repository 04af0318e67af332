#!/bin/sh
# pip of the image's virtual environment, with the build's two optional secrets: a pip configuration (index,
# find-links for a local torch wheel) and a CA bundle. BuildKit mounts them only for the RUN that installs,
# so neither is left in a layer.
set -eu
if [ -s /run/secrets/pipconf ]; then export PIP_CONFIG_FILE=/run/secrets/pipconf; fi
if [ -s /run/secrets/cacert ]; then export PIP_CERT=/run/secrets/cacert; fi
exec /opt/venv/bin/pip --no-cache-dir --disable-pip-version-check "$@"
