#!/bin/sh
# Starts Chromium as an unprivileged user, with its sandbox on, for a caller that runs as root.
#
# Playwright (as root) runs this in Chromium's place: it hands over the profile folder it made for the browser
# (--user-data-dir, created 0700 for root) to the browser's user, then drops to that user and group and execs
# Chromium with a clean environment (no secret meant for another program gets in). Playwright's pipe to the
# browser (fds 3 and 4) survives the exec. Set by stages/browser/chromium.py:
#   SIPBRIDGE_CHROMIUM_UID, SIPBRIDGE_CHROMIUM_GID   numeric ids to run as (never 0)
#   SIPBRIDGE_CHROMIUM_BIN                           the real Chromium
set -eu
uid="${SIPBRIDGE_CHROMIUM_UID:?}"
gid="${SIPBRIDGE_CHROMIUM_GID:?}"
bin="${SIPBRIDGE_CHROMIUM_BIN:?}"
if [ "$uid" = 0 ] || [ "$gid" = 0 ]; then
  echo "chromium-as-user: refusing to run Chromium as root" >&2
  exit 1
fi
profile=""
for arg in "$@"; do
  case "$arg" in
    --user-data-dir=*) profile="${arg#--user-data-dir=}" ;;
  esac
done
if [ -n "$profile" ]; then
  chown -R "$uid:$gid" "$profile"
  home="$profile"
else
  home="/nonexistent"
fi
# --reset-env keeps only TERM and sets PATH, HOME, USER, LOGNAME and SHELL; HOME is then pointed at the profile,
# the one folder the browser's user may write (the user's own home usually does not exist).
exec setpriv --reuid="$uid" --regid="$gid" --clear-groups --reset-env \
  /usr/bin/env HOME="$home" LANG=C.UTF-8 "$bin" "$@"
