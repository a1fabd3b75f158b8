package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/gwota/gwota/test/testenv"
)

// nobody is a uid that is neither root nor the test's own user.
const nobody = 65534

func TestSafeDir(t *testing.T) {
	testenv.NeedRoot(t, "to chown directories to another user")
	base := t.TempDir() // root-owned, under the sticky /tmp
	mk := func(p string, mode os.FileMode, uid int) string {
		t.Helper()
		p = filepath.Join(base, p)
		if err := os.MkdirAll(p, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Lchown(p, uid, -1); err != nil {
			t.Fatal(err)
		}
		return p
	}
	link := func(name, to string, uid int) string {
		t.Helper()
		p := filepath.Join(base, name)
		if err := os.Symlink(to, p); err != nil {
			t.Fatal(err)
		}
		if err := os.Lchown(p, uid, -1); err != nil {
			t.Fatal(err)
		}
		return p
	}
	safe := mk("safe", 0o755, 0)
	sticky := mk("sticky", 0o777|os.ModeSticky, 0)
	underSticky := mk("sticky/app", 0o755, 0)
	userOwnedUnderSticky := mk("sticky/theirs", 0o755, nobody)
	world := mk("world", 0o777, 0)
	group := mk("group", 0o775, 0)
	foreign := mk("foreign", 0o755, nobody)
	belowForeign := mk("foreign/app", 0o755, 0)
	belowWorld := mk("world/app", 0o755, 0)
	for _, tc := range []struct {
		name, dir string
		bad       string // "" means accepted; else a part of the message
	}{
		{"root-owned 0755", safe, ""},
		{"below a sticky world-writable directory", underSticky, ""},
		{"not yet created below a safe directory", filepath.Join(safe, "later", "app"), ""},
		{"sticky world-writable itself", sticky, "writable by group or others"},
		{"world-writable", world, "writable by group or others"},
		{"group-writable", group, "writable by group or others"},
		{"owned by another user", foreign, "owned by uid 65534"},
		{"below a directory of another user", belowForeign, "owned by uid 65534"},
		{"below a world-writable directory", belowWorld, "writable by group or others"},
		{"another user's directory below a sticky one", userOwnedUnderSticky, "owned by uid 65534"},
		{"not yet created below a sticky directory", filepath.Join(sticky, "later"), "any user may create it"},
		{"symlink to a safe directory", link("to-safe", safe, 0), ""},
		{"symlink to a world-writable directory", link("to-world", world, 0), "writable by group or others"},
		{"relative symlink through ..", link("rel", "../"+filepath.Base(base)+"/world", 0), "writable by group or others"},
		{"symlink owned by another user", link("theirs-link", safe, nobody), "symbolic link"},
		{"a file, not a directory", func() string { p := filepath.Join(safe, "f"); os.WriteFile(p, nil, 0o644); return p }(), "not a directory"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := SafeDir(tc.dir)
			switch {
			case tc.bad == "" && err != nil:
				t.Fatalf("refused: %v", err)
			case tc.bad != "" && (err == nil || !strings.Contains(err.Error(), tc.bad)):
				t.Fatalf("got %v, want an error saying %q", err, tc.bad)
			}
		})
	}

	// At load: refused with the key that accepts it named, accepted with the key.
	cfg := func(dir string, allow bool) string {
		return minimal + "[[target]]\nname = \"app\"\nkind = \"file\"\nfile_types = [1]\npath = \"" + filepath.Join(dir, "bundle.tar") + "\"\n" +
			map[bool]string{true: "allow_writable_dir = true\n"}[allow]
	}
	if _, err := Parse([]byte(cfg(world, false))); err == nil || !strings.Contains(err.Error(), "allow_writable_dir") {
		t.Fatalf("file target in a world-writable directory: got %v", err)
	}
	if _, err := Parse([]byte(cfg(world, true))); err != nil {
		t.Fatalf("allow_writable_dir = true: %v", err)
	}
	if _, err := Parse([]byte(cfg(safe, false))); err != nil {
		t.Fatal(err)
	}
	if _, err := Parse([]byte(minimal + "allow_writable_dir = true\n")); err == nil {
		t.Fatal("allow_writable_dir accepted on an A/B target")
	}
}
