#!/usr/bin/env bash
# Checks the deployment in deploy/ without a running systemd:
#   1. systemd-analyze security --offline: ota-net.service <= 1.0,
#      ota-writer.service <= 1.5 (alone and with each example drop-in);
#   2. systemd-analyze verify of all units (and drop-ins) in a scratch root
#      with stub binaries: any diagnostic fails;
#   3. sysusers.d and tmpfiles.d applied to a scratch root: users, groups,
#      owners and modes;
#   4. the .deb built by scripts/package.sh: contents, modes, owners, control
#      fields, maintainer scripts, the binaries run;
#   5. the maintainer scripts' behaviour (private mount namespace, systemctl
#      and friends recorded by stubs): enable the units, start only the
#      socket, never start or restart a daemon on install or upgrade.
#   6. with --install (root, a disposable machine such as CI): dpkg -i the
#      package for real, check users, directories and enabled units, then
#      dpkg --purge it and check it is gone.
# Exits non-zero on any failure. Prints the exposure figures and a closing
# "N passed, N failed" line.
#
#   scripts/check-deploy.sh [--install]   (GWOTA_BIN=dir: package prebuilt binaries)
set -uo pipefail

install=
case "${1:-}" in
--install) install=yes ;;
"") ;;
*) echo "usage: $0 [--install]" >&2; exit 2 ;;
esac

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
deploy=$root/deploy
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

passed=0 failed=0
pass() { passed=$((passed + 1)); echo "PASS $*"; }
fail() { failed=$((failed + 1)); echo "FAIL $*"; }
# check NAME CMD...: pass when CMD exits 0.
check() {
	local name=$1; shift
	if "$@"; then pass "$name"; else fail "$name"; fi
}

for tool in systemd-analyze systemd-sysusers systemd-tmpfiles dpkg-deb unshare; do
	command -v "$tool" >/dev/null || { echo "check-deploy: $tool is required" >&2; exit 2; }
done
systemd_units=$(systemd-analyze unit-paths 2>/dev/null | grep -m1 -E '^/(usr/)?lib/systemd/system$')
[[ -n $systemd_units ]] || systemd_units=/usr/lib/systemd/system

# scratch_root DIR [DROPIN]: the units installed as the package installs them,
# plus the host's own units (verify resolves sysinit.target & co.), stub
# binaries, and optionally a drop-in for the writer.
scratch_root() {
	local r=$1 dropin=${2:-}
	mkdir -p "$r/usr/lib/systemd" "$r/usr/bin" "$r/etc/systemd/system"
	cp -a "$systemd_units" "$r/usr/lib/systemd/system"
	cp "$deploy"/systemd/ota-writer.socket "$deploy"/systemd/*.service "$r/usr/lib/systemd/system/"
	printf '#!/bin/sh\nexit 0\n' >"$r/usr/bin/ota-writer"
	cp "$r/usr/bin/ota-writer" "$r/usr/bin/ota-net"
	chmod 0755 "$r/usr/bin/ota-writer" "$r/usr/bin/ota-net"
	if [[ -n $dropin ]]; then
		local unit=ota-writer
		[[ $(basename "$dropin") == ota-net-* ]] && unit=ota-net
		mkdir -p "$r/etc/systemd/system/$unit.service.d"
		cp "$dropin" "$r/etc/systemd/system/$unit.service.d/board.conf"
	fi
}

echo "== 1. exposure (systemd-analyze security --offline=true, $(systemd-analyze --version | head -1))"
# exposure ROOT UNIT MAX LABEL: the figure, checked with --threshold (10 = 1.0).
exposure() {
	local r=$1 unit=$2 max=$3 label=$4 out figure
	out=$(systemd-analyze security --offline=true --root="$r" --threshold="$max" "$unit" 2>&1)
	local rc=$?
	figure=$(sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p' <<<"$out")
	if [[ -z $figure ]]; then
		fail "exposure $label: no figure"; echo "$out" | tail -5; return
	fi
	local maxf; maxf=$(awk -v m="$max" 'BEGIN { printf "%.1f", m / 10 }')
	echo "exposure $label: $figure (max $maxf)"
	if ((rc == 0)); then pass "exposure $label $figure <= $maxf"; else fail "exposure $label $figure > $maxf"; fi
}
scratch_root "$work/sec"
exposure "$work/sec" ota-net.service 10 "ota-net.service"
exposure "$work/sec" ota-writer.service 15 "ota-writer.service"
for d in "$deploy"/systemd/examples/ota-writer-*.conf; do
	r=$work/sec-$(basename "$d" .conf)
	scratch_root "$r" "$d"
	exposure "$r" ota-writer.service 15 "ota-writer.service + $(basename "$d")"
done
for d in "$deploy"/systemd/examples/ota-net-*.conf; do
	r=$work/sec-$(basename "$d" .conf)
	scratch_root "$r" "$d"
	exposure "$r" ota-net.service 10 "ota-net.service + $(basename "$d")"
done

echo "== 2. systemd-analyze verify"
verify() {
	local r=$1 label=$2 out
	out=$(systemd-analyze verify --root="$r" ota-writer.socket ota-writer.service ota-net.service 2>&1)
	local rc=$?
	if ((rc == 0)) && [[ -z $out ]]; then pass "verify $label"; else fail "verify $label (rc $rc)"; echo "$out"; fi
}
verify "$work/sec" "units"
for d in "$deploy"/systemd/examples/ota-writer-*.conf "$deploy"/systemd/examples/ota-net-*.conf; do
	verify "$work/sec-$(basename "$d" .conf)" "units + $(basename "$d")"
done

echo "== 3. sysusers.d and tmpfiles.d"
u=$work/users
mkdir -p "$u/etc" "$u/usr/lib/sysusers.d" "$u/usr/lib/tmpfiles.d"
touch "$u/etc/passwd" "$u/etc/group"
cp "$deploy/sysusers.d/ota.conf" "$u/usr/lib/sysusers.d/gwota.conf"
cp "$deploy/tmpfiles.d/ota.conf" "$u/usr/lib/tmpfiles.d/gwota.conf"
check "systemd-sysusers applies" systemd-sysusers --root="$u" gwota.conf
check "systemd-tmpfiles applies" systemd-tmpfiles --create --root="$u" gwota.conf
gid_ota=$(awk -F: '$1 == "ota" { print $3 }' "$u/etc/group")
IFS=: read -r _ _ uid_net gid_net _ home_net shell_net < <(grep '^ota-net:' "$u/etc/passwd")
check "group ota exists" test -n "$gid_ota"
check "user ota-net: primary group ota, no login" test "${gid_net:-x}" = "$gid_ota" -a "${shell_net:-}" = /usr/sbin/nologin -a "${home_net:-}" = /var/lib/ota-net
check "user ota-net is a system user" test "${uid_net:-1000}" -lt 1000
# path mode uid gid
while read -r p mode uid gid; do
	[[ $uid == net ]] && uid=$uid_net
	[[ $gid == ota ]] && gid=$gid_ota
	got=$(stat -c '%a %u %g' "$u$p" 2>/dev/null)
	check "tmpfiles $p is $mode $uid:$gid (got ${got:-missing})" test "$got" = "$mode $uid $gid"
done <<EOT
/etc/ota 755 0 0
/etc/ota/keys 700 0 0
/etc/ota/net 700 0 0
/var/lib/ota-writer 700 0 0
/var/lib/ota-net 700 net ota
/run/ota 755 0 0
EOT

echo "== 4. package"
deb=$(scripts/package.sh "$work/out" | tail -1)
if [[ ! -f $deb ]]; then
	fail "package built"
else
	pass "package built: $(basename "$deb")"
	contents=$(dpkg-deb -c "$deb" | awk '{ sub(/^\./, "", $6); print $1, $2, $6 }')
	# Exactly these paths, with these modes and owners: nothing missing, nothing extra.
	want=$(cat <<EOT
drwxr-xr-x root/root /etc/
drwxr-xr-x root/root /etc/ota/
drwx------ root/root /etc/ota/keys/
drwx------ root/root /etc/ota/net/
drwxr-xr-x root/root /usr/
drwxr-xr-x root/root /usr/bin/
-rwxr-xr-x root/root /usr/bin/ota-net
-rwxr-xr-x root/root /usr/bin/ota-writer
drwxr-xr-x root/root /usr/lib/
drwxr-xr-x root/root /usr/lib/systemd/
drwxr-xr-x root/root /usr/lib/systemd/system/
-rw-r--r-- root/root /usr/lib/systemd/system/ota-net.service
-rw-r--r-- root/root /usr/lib/systemd/system/ota-writer.service
-rw-r--r-- root/root /usr/lib/systemd/system/ota-writer.socket
drwxr-xr-x root/root /usr/lib/sysusers.d/
-rw-r--r-- root/root /usr/lib/sysusers.d/gwota.conf
drwxr-xr-x root/root /usr/lib/tmpfiles.d/
-rw-r--r-- root/root /usr/lib/tmpfiles.d/gwota.conf
drwxr-xr-x root/root /usr/share/
drwxr-xr-x root/root /usr/share/doc/
drwxr-xr-x root/root /usr/share/doc/gwota/
-rw-r--r-- root/root /usr/share/doc/gwota/README.md
drwxr-xr-x root/root /usr/share/doc/gwota/examples/
-rw-r--r-- root/root /usr/share/doc/gwota/examples/fw_env.config
-rw-r--r-- root/root /usr/share/doc/gwota/examples/net.toml
drwxr-xr-x root/root /usr/share/doc/gwota/examples/systemd/
-rw-r--r-- root/root /usr/share/doc/gwota/examples/systemd/ota-writer-app-bundle.conf
-rw-r--r-- root/root /usr/share/doc/gwota/examples/systemd/ota-writer-grub-x86.conf
-rw-r--r-- root/root /usr/share/doc/gwota/examples/systemd/ota-writer-uboot-emmc.conf
-rw-r--r-- root/root /usr/share/doc/gwota/examples/writer-app-bundle.toml
-rw-r--r-- root/root /usr/share/doc/gwota/examples/writer-grub-x86.toml
-rw-r--r-- root/root /usr/share/doc/gwota/examples/writer-uboot-emmc.toml
EOT
)
	if d=$(diff <(sort <<<"$want") <(sort <<<"$contents")); then
		pass "package contents, modes and owners"
	else
		fail "package contents, modes and owners (- expected, + packaged)"; echo "$d"
	fi
	check "no live configuration in /etc/ota (installing starts no update)" \
		bash -c '! grep -qE " /etc/ota/.*\.toml$" <<<"$1"' _ "$contents"
	field() { dpkg-deb -f "$deb" "$1"; }
	check "Package: gwota" test "$(field Package)" = gwota
	check "Architecture matches the build ($(field Architecture))" test "$(field Architecture)" = "${GWOTA_ARCH:-$(dpkg --print-architecture)}"
	check "Depends: systemd" grep -qw systemd <<<"$(field Depends)"
	check "Recommends: libubootenv-tool" grep -qw libubootenv-tool <<<"$(field Recommends)"
	check "Suggests: grub-common" grep -qw grub-common <<<"$(field Suggests)"
	ctrl=$work/control
	dpkg-deb -e "$deb" "$ctrl"
	for s in postinst prerm postrm; do
		check "maintainer script $s: executable, parses, same as deploy/scripts/$s" \
			bash -c 'test -x "$1" && sh -n "$1" && cmp -s "$1" "$2"' _ "$ctrl/$s" "$deploy/scripts/$s"
	done
	x=$work/extract
	dpkg-deb -x "$deb" "$x"
	for f in systemd/ota-writer.socket:usr/lib/systemd/system/ota-writer.socket \
		systemd/ota-writer.service:usr/lib/systemd/system/ota-writer.service \
		systemd/ota-net.service:usr/lib/systemd/system/ota-net.service \
		sysusers.d/ota.conf:usr/lib/sysusers.d/gwota.conf \
		tmpfiles.d/ota.conf:usr/lib/tmpfiles.d/gwota.conf; do
		check "packaged /${f#*:} is deploy/${f%%:*}" cmp -s "$deploy/${f%%:*}" "$x/${f#*:}"
	done
	if [[ $(field Architecture) == "$(dpkg --print-architecture)" ]]; then
		for b in ota-writer ota-net; do
			check "packaged $b runs (-h)" bash -c '"$1" -h >/dev/null 2>&1' _ "$x/usr/bin/$b"
		done
	fi
fi

echo "== 5. maintainer scripts"
# Run a maintainer script in a private mount namespace where /run looks like a
# booted systemd and /var/lib is scratch, with systemctl, deb-systemd-helper,
# systemd-sysusers and systemd-tmpfiles replaced by stubs that record their
# arguments (systemd itself does not run here). Prints the record.
stubs=$work/stubs
mkdir -p "$stubs"
for t in systemctl deb-systemd-helper systemd-sysusers systemd-tmpfiles adduser addgroup; do
	printf '#!/bin/sh\necho "%s $*" >>"$GWOTA_RECORD"\n' "$t" >"$stubs/$t"
	chmod 0755 "$stubs/$t"
done
run_script() {
	local script=$1; shift
	local rec=$work/record
	: >"$rec"
	unshare -m bash -c '
		set -e
		mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/system
		mount -t tmpfs tmpfs /var/lib && mkdir -p /var/lib/ota-writer /var/lib/ota-net
		script=$1; shift
		GWOTA_RECORD=$0 PATH='"$stubs"':/usr/sbin:/usr/bin:/sbin:/bin sh "$script" "$@"
		for d in ota-writer ota-net; do [ -d /var/lib/$d ] || echo "removed /var/lib/$d" >>"$0"; done
	' "$rec" "$deploy/scripts/$script" "$@" || echo "exit status $?" >>"$rec"
	cat "$rec"
}
# expect LABEL RECORD PATTERN...: each extended regexp matches a line.
expect() {
	local label=$1 rec=$2; shift 2
	for p in "$@"; do
		if grep -qE "$p" <<<"$rec"; then pass "$label: $p"; else fail "$label: $p"; echo "$rec" | sed 's/^/    /'; fi
	done
}
# refuse LABEL RECORD PATTERN...: no line matches.
refuse() {
	local label=$1 rec=$2; shift 2
	for p in "$@"; do
		if grep -qE "$p" <<<"$rec"; then fail "$label: no $p"; echo "$rec" | sed 's/^/    /'; else pass "$label: no $p"; fi
	done
}
starts='^systemctl .*(start|restart|reload-or-restart|try-restart) .*(ota-net|ota-writer\.service)|--now'
rec=$(run_script postinst configure)
expect "postinst (install)" "$rec" '^systemd-sysusers gwota\.conf$' '^systemd-tmpfiles --create gwota\.conf$' \
	'^deb-systemd-helper enable ota-writer\.socket ota-net\.service$' '^systemctl start ota-writer\.socket$'
refuse "postinst (install)" "$rec" "$starts" '^exit status'
rec=$(run_script postinst configure 0.0~git1.abc)
expect "postinst (upgrade)" "$rec" '^systemd-sysusers gwota\.conf$' '^systemctl --system daemon-reload$'
refuse "postinst (upgrade)" "$rec" "$starts" '^systemctl start' 'enable' '^exit status'
rec=$(run_script prerm upgrade 0.0~git2.def)
refuse "prerm (upgrade)" "$rec" '^systemctl' '^exit status'
rec=$(run_script prerm remove)
expect "prerm (remove)" "$rec" '^systemctl stop ota-net\.service ota-writer\.service ota-writer\.socket$'
rec=$(run_script postrm remove)
refuse "postrm (remove)" "$rec" '^removed' '^exit status'
rec=$(run_script postrm purge)
expect "postrm (purge)" "$rec" '^deb-systemd-helper purge ota-writer\.socket ota-net\.service$' \
	'^removed /var/lib/ota-writer$' '^removed /var/lib/ota-net$'

if [[ -n $install ]]; then
	echo "== 6. dpkg -i / dpkg --purge on this machine"
	if [[ $(id -u) != 0 ]]; then
		fail "--install needs root"
	elif [[ ! -f ${deb:-} ]]; then
		fail "--install: no package to install"
	elif dpkg-query -W -f='${Status}' gwota 2>/dev/null | grep -q 'install ok installed'; then
		fail "--install: gwota is already installed here; refusing to replace it"
	else
		out=$(dpkg -i "$deb" 2>&1)
		if (($? == 0)); then pass "dpkg -i"; else fail "dpkg -i"; echo "$out"; fi
		check "installed: user ota-net in group ota" test "$(id -gn ota-net 2>/dev/null)" = ota
		check "installed: /etc/ota/keys is root 0700" test "$(stat -c '%a %U' /etc/ota/keys 2>/dev/null)" = "700 root"
		check "installed: /var/lib/ota-net belongs to ota-net" test "$(stat -c '%a %U %G' /var/lib/ota-net 2>/dev/null)" = "700 ota-net ota"
		check "installed: ota-writer.socket enabled" test -L /etc/systemd/system/sockets.target.wants/ota-writer.socket
		check "installed: ota-net.service enabled" test -L /etc/systemd/system/multi-user.target.wants/ota-net.service
		check "installed: no live configuration" bash -c '! ls /etc/ota/*.toml >/dev/null 2>&1'
		check "installed: ota-writer runs" bash -c '/usr/bin/ota-writer -h >/dev/null 2>&1'
		out=$(dpkg --purge gwota 2>&1)
		if (($? == 0)); then pass "dpkg --purge"; else fail "dpkg --purge"; echo "$out"; fi
		check "purged: binaries gone" test ! -e /usr/bin/ota-writer -a ! -e /usr/bin/ota-net
		check "purged: units disabled" test ! -e /etc/systemd/system/sockets.target.wants/ota-writer.socket -a ! -e /etc/systemd/system/multi-user.target.wants/ota-net.service
		check "purged: state removed" test ! -e /var/lib/ota-writer -a ! -e /var/lib/ota-net
	fi
fi

echo "$passed passed, $failed failed"
((failed == 0))
