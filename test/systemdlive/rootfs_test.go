package systemdlive

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"
)

// The container's root file system: Debian bookworm (systemd 252, what the package targets),
// minimal, with systemd as init. Built once by mmdebstrap through the Debian mirror apt on
// this machine already uses, and cached as a tarball keyed by everything that shapes it, so
// a CI run on the same machine (a fresh clone) extracts it in seconds instead of downloading.
const (
	suite      = "bookworm"
	variant    = "minbase"
	cacheDir   = "/var/cache/gwota-test"
	includePkg = "systemd,systemd-sysv,dbus,iproute2"
)

// aptSources returns the deb822 stanzas of this machine's apt configuration that serve the
// suite (and its -updates/-security), so mmdebstrap uses the same mirror as apt. Nothing
// names a mirror host in the repository.
func aptSources() (string, error) {
	var files []string
	if _, err := os.Stat("/etc/apt/sources.list"); err == nil {
		files = append(files, "/etc/apt/sources.list")
	}
	for _, pat := range []string{"/etc/apt/sources.list.d/*.list", "/etc/apt/sources.list.d/*.sources"} {
		m, _ := filepath.Glob(pat)
		files = append(files, m...)
	}
	sort.Strings(files)
	var out []string
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			return "", err
		}
		if strings.HasSuffix(f, ".sources") {
			out = append(out, deb822Stanzas(string(b))...)
		} else {
			out = append(out, oneLineStanzas(string(b))...)
		}
	}
	if len(out) == 0 {
		return "", fmt.Errorf("no apt source for %s in /etc/apt/sources.list{,.d}", suite)
	}
	return strings.Join(out, "\n"), nil
}

func servesSuite(suites []string) bool {
	for _, s := range suites {
		if s == suite || strings.HasPrefix(s, suite+"-") {
			return true
		}
	}
	return false
}

func deb822Stanzas(text string) []string {
	var out []string
	for _, st := range strings.Split(text, "\n\n") {
		fields := map[string]string{}
		var lines []string
		for _, l := range strings.Split(st, "\n") {
			if strings.HasPrefix(strings.TrimSpace(l), "#") || strings.TrimSpace(l) == "" {
				continue
			}
			lines = append(lines, l)
			if k, v, ok := strings.Cut(l, ":"); ok && !strings.HasPrefix(l, " ") {
				fields[strings.ToLower(strings.TrimSpace(k))] = strings.TrimSpace(v)
			}
		}
		if !strings.Contains(" "+fields["types"]+" ", " deb ") || strings.EqualFold(fields["enabled"], "no") ||
			!servesSuite(strings.Fields(fields["suites"])) {
			continue
		}
		out = append(out, strings.Join(lines, "\n")+"\n")
	}
	return out
}

func oneLineStanzas(text string) []string {
	var out []string
	sc := bufio.NewScanner(strings.NewReader(text))
	for sc.Scan() {
		l := strings.TrimSpace(sc.Text())
		if !strings.HasPrefix(l, "deb ") {
			continue
		}
		l = strings.TrimSpace(strings.TrimPrefix(l, "deb"))
		signedBy := ""
		if strings.HasPrefix(l, "[") {
			opts, rest, _ := strings.Cut(l[1:], "]")
			for _, o := range strings.Fields(opts) {
				if k, v, ok := strings.Cut(o, "="); ok && k == "signed-by" {
					signedBy = v
				}
			}
			l = strings.TrimSpace(rest)
		}
		f := strings.Fields(l)
		if len(f) < 3 || !servesSuite(f[1:2]) {
			continue
		}
		s := fmt.Sprintf("Types: deb\nURIs: %s\nSuites: %s\nComponents: %s\n", f[0], f[1], strings.Join(f[2:], " "))
		if signedBy != "" {
			s += "Signed-By: " + signedBy + "\n"
		}
		out = append(out, s)
	}
	return out
}

// rootfsTarball returns the cached rootfs tarball, building it first when absent. built
// tells whether it was built now, took how long.
func rootfsTarball(ctx context.Context) (path string, built bool, took time.Duration, err error) {
	sources, err := aptSources()
	if err != nil {
		return "", false, 0, err
	}
	h := sha256.Sum256([]byte(strings.Join([]string{suite, variant, includePkg, sources}, "\x00")))
	key := hex.EncodeToString(h[:8])
	if err := os.MkdirAll(cacheDir, 0o755); err != nil {
		return "", false, 0, err
	}
	path = filepath.Join(cacheDir, "rootfs-"+suite+"-"+key+".tar")
	// One builder at a time; a concurrent run waits and then finds the tarball.
	lock, err := os.OpenFile(filepath.Join(cacheDir, "rootfs.lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return "", false, 0, err
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return "", false, 0, err
	}
	if _, err := os.Stat(path); err == nil {
		return path, false, 0, nil
	}
	tmp := path + ".partial.tar"
	start := time.Now()
	cmd := exec.CommandContext(ctx, "mmdebstrap", "--variant="+variant, "--include="+includePkg, suite, tmp, "-")
	cmd.Stdin = strings.NewReader(sources)
	if out, err := cmd.CombinedOutput(); err != nil {
		os.Remove(tmp)
		return "", false, 0, fmt.Errorf("mmdebstrap: %w\n%s", err, tail(string(out), 30))
	}
	if err := os.Rename(tmp, path); err != nil {
		return "", false, 0, err
	}
	return path, true, time.Since(start), nil
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
