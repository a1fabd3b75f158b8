package config

import (
	"bytes"
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/gwota/gwota/status"
)

const minimal = `
state_dir = "/var/lib/ota-writer"
trusted_keys = ["/etc/ota/keys/signer.crt.pem"]
[[target]]
name = "rootfs"
kind = "ab"
file_types = [0]
slots = ["/dev/mmcblk0p2", "/dev/mmcblk0p3"]
`

func TestExampleParses(t *testing.T) {
	data, err := os.ReadFile("example.toml")
	if err != nil {
		t.Fatal(err)
	}
	// The example names ota-net, which exists only where the package is installed; elsewhere
	// nobody (present on every Debian system) stands in for it.
	peer := "ota-net"
	if _, err := user.Lookup(peer); err != nil {
		peer = "nobody"
		data = bytes.Replace(data, []byte(`peer_users = ["ota-net"]`), []byte(`peer_users = ["nobody"]`), 1)
	}
	c, err := Parse(data)
	if err != nil {
		t.Fatal(err)
	}
	if want := []int{lookupUID(t, peer)}; !cmp.Equal(c.PeerUIDs, want) {
		t.Errorf("peer uids %v, want %v (%s)", c.PeerUIDs, want, peer)
	}
	want := []Target{
		{Name: "rootfs", Kind: KindAB, FileTypes: []int32{0}, FilePaths: []string{"/opt/fw/gateway.img"},
			Slots: []string{"/dev/mmcblk0p2", "/dev/mmcblk0p3"}, MaxSize: 536870912, Compatible: "acme,gw-1"},
		{Name: "app", Kind: KindFile, FileTypes: []int32{1}, Path: "/opt/app/bundle.tar", MaxSize: 268435456,
			TrustedKeys: []string{"/etc/ota/keys/app-signer.crt.pem"}},
	}
	if d := cmp.Diff(want, c.Targets); d != "" {
		t.Errorf("targets (-want +got):\n%s", d)
	}
	if c.SyncInterval != 2*time.Second || c.SelfTestTimeout != 2*time.Minute || c.Checks[0].Timeout != 30*time.Second {
		t.Errorf("durations: %v %v %v", c.SyncInterval, c.SelfTestTimeout, c.Checks[0].Timeout)
	}
	if c.VersionPolicy != VersionNewer || c.SocketGroup != "ota" {
		t.Errorf("got %+v", c)
	}
	if c.Extensions["site"] != "plant-7" || c.ExtensionCommands[0].Timeout != 5*time.Second {
		t.Errorf("extensions: %v %v", c.Extensions, c.ExtensionCommands)
	}
}

func TestDefaults(t *testing.T) {
	c, err := Parse([]byte(minimal))
	if err != nil {
		t.Fatal(err)
	}
	got := []any{c.Socket, c.MaxBlockSize, c.SyncBytes, c.SyncInterval, c.VersionPolicy, c.Boot.Backend, c.Boot.BootLimit, c.AllowSHA1, c.AllowAnyTrustedKey, c.Reserve()}
	want := []any{DefaultSocket, uint32(DefaultMaxBlockSize), int64(DefaultSyncBytes), DefaultSyncInterval, VersionAny, BootFile, DefaultBootLimit, false, false, uint64(DefaultFreeSpaceReserve)}
	if d := cmp.Diff(want, got); d != "" {
		t.Errorf("defaults (-want +got):\n%s", d)
	}
	c, err = Parse([]byte(minimal + "[boot]\nbackend = \"uboot\"\n"))
	if err != nil {
		t.Fatal(err)
	}
	if c.Boot.FwSetenv != "fw_setenv" || c.Boot.FwPrintenv != "fw_printenv" {
		t.Errorf("uboot defaults: %+v", c.Boot)
	}
}

func TestInvalid(t *testing.T) {
	for _, tc := range []struct {
		name, toml, want string
	}{
		{"unknown top key", "sokcet = \"/x\"\n" + minimal, "unknown keys: sokcet"},
		{"unknown target key", strings.Replace(minimal, "kind = \"ab\"", "kind = \"ab\"\nslot = \"x\"", 1), "unknown keys: target.slot"},
		{"syntax", "socket = ", "expected value"},
		{"duplicate name", minimal + "[[target]]\nname = \"rootfs\"\nkind = \"file\"\nfile_types = [1]\npath = \"/x/y\"\n", "duplicate target name"},
		{"one slot", strings.Replace(minimal, `"/dev/mmcblk0p2", `, "", 1), "exactly two paths"},
		{"same slots", strings.Replace(minimal, "p3", "p2", 1), "are the same path"},
		{"relative slot", strings.Replace(minimal, "/dev/mmcblk0p3", "mmcblk0p3", 1), `slots[1]: "mmcblk0p3" is not an absolute path`},
		{"relative file", minimal + "[[target]]\nname = \"app\"\nkind = \"file\"\nfile_types = [1]\npath = \"app.tar\"\n", "not an absolute file path"},
		{"unselectable", strings.Replace(minimal, "file_types = [0]", "", 1), "neither file_types nor file_paths"},
		{"bad kind", strings.Replace(minimal, `kind = "ab"`, `kind = "ubi"`, 1), `kind "ubi" is not ab or file`},
		{"type routed twice", minimal + "[[target]]\nname = \"app\"\nkind = \"file\"\nfile_types = [0]\npath = \"/x/y\"\n", "file type 0 is already routed"},
		{"medium shared", minimal + "[[target]]\nname = \"app\"\nkind = \"file\"\nfile_types = [1]\npath = \"/dev/mmcblk0p2\"\n", "already used by target"},
		{"block size", "max_block_size = 100\n" + minimal, "max_block_size: 100 outside"},
		{"policy", "version_policy = \"older\"\n" + minimal, "version_policy"},
		{"compatible with a control character", strings.Replace(minimal, `kind = "ab"`, "kind = \"ab\"\ncompatible = \"a\\tb\"", 1), "compatible: at most 256 printable"},
		{"compatible too long", strings.Replace(minimal, `kind = "ab"`, "kind = \"ab\"\ncompatible = \""+strings.Repeat("c", 257)+"\"", 1), "compatible: at most 256 printable"},
		{"backend", minimal + "[boot]\nbackend = \"lilo\"\n", "boot.backend"},
		{"grub keys on file", minimal + "[boot]\ngrub_env = \"/boot/grubenv\"\n", "grub keys set"},
		{"check without command", minimal + "[[check]]\nname = \"x\"\n", "command is empty"},
		{"bad duration", "sync_interval = \"soon\"\n" + minimal, "sync_interval"},
		{"relative key", strings.Replace(minimal, "/etc/ota/keys/signer.crt.pem", "signer.pem", 1), "trusted_keys[0]"},
		{"bad ext key", minimal + "[extensions]\n\"a b\" = \"c\"\n", `key "a b"`},
		{"relative target key", minimal + "[[target]]\nname = \"app\"\nkind = \"file\"\nfile_types = [1]\npath = \"/x/y\"\ntrusted_keys = [\"k.pem\"]\n", `target[1] "app": trusted_keys[0]: "k.pem"`},
		// One boot switch: a second A/B target is refused, naming both.
		{"second ab target", minimal + "[[target]]\nname = \"kernel\"\nkind = \"ab\"\nfile_types = [2]\nslots = [\"/dev/mmcblk0p5\", \"/dev/mmcblk0p6\"]\n",
			`target[1] "kernel": a second A/B target; target "rootfs" already uses the only boot switch`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse([]byte(tc.toml))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want error containing %q", err, tc.want)
			}
		})
	}
}

func TestLoadMissing(t *testing.T) {
	if _, err := Load(filepath.Join(t.TempDir(), "none.toml")); !os.IsNotExist(unwrapAll(err)) {
		t.Fatalf("got %v", err)
	}
}

func unwrapAll(err error) error {
	for {
		u, ok := err.(interface{ Unwrap() error })
		if !ok {
			return err
		}
		err = u.Unwrap()
	}
}

func lookupUID(t *testing.T, name string) int {
	t.Helper()
	u, err := user.Lookup(name)
	if err != nil {
		t.Fatal(err)
	}
	uid, err := strconv.Atoi(u.Uid)
	if err != nil {
		t.Fatal(err)
	}
	return uid
}

// peer_users resolves names to uids at load and adds them to peer_uids; a name that does not
// resolve fails the load with a message that names it.
func TestPeerUsers(t *testing.T) {
	nobody := lookupUID(t, "nobody")
	for _, tc := range []struct {
		name    string
		toml    string
		want    []int
		wantErr string
	}{
		{"none", "", nil, ""},
		{"uids only", "peer_uids = [998]\n", []int{998}, ""},
		{"root", "peer_users = [\"root\"]\n", []int{0}, ""},
		{"nobody and root", "peer_users = [\"nobody\", \"root\"]\n", []int{nobody, 0}, ""},
		{"uids first, users added", "peer_uids = [998]\npeer_users = [\"nobody\"]\n", []int{998, nobody}, ""},
		{"duplicate collapses", fmt.Sprintf("peer_uids = [%d]\npeer_users = [\"nobody\", \"nobody\"]\n", nobody), []int{nobody}, ""},
		{"unknown user", "peer_users = [\"no-such-user-gwota\"]\n", nil, `peer_users[0]: no user "no-such-user-gwota" on this system`},
		{"unknown after a known one", "peer_users = [\"root\", \"ota-nett\"]\n", nil, `peer_users[1]: no user "ota-nett"`},
		{"empty name", "peer_users = [\"\"]\n", nil, "peer_users[0]: empty user name"},
		{"not a list", "peer_users = \"root\"\n", nil, "peer_users"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := Parse([]byte(tc.toml + minimal))
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("Parse error %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if d := cmp.Diff(tc.want, c.PeerUIDs); d != "" {
				t.Errorf("peer uids (-want +got):\n%s", d)
			}
		})
	}
	// Reported together with the other problems, not instead of them.
	_, err := Parse([]byte("peer_users = [\"no-such-user-gwota\"]\nmax_block_size = 1\n" + minimal))
	for _, want := range []string{"max_block_size: 1 outside", `no user "no-such-user-gwota"`} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Parse error %v, want it to contain %q", err, want)
		}
	}
}

// The [extensions] pairs keep the order of the file: the statusDetails budget goes to them in
// that order.
func TestStaticExtensionsKeepFileOrder(t *testing.T) {
	c, err := Parse([]byte(minimal + "\n[extensions]\nzz_site = \"north\"\nhardware_rev = \"C2\"\naa_rack = \"7\"\n"))
	if err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(status.Pairs("zz_site", "north", "hardware_rev", "C2", "aa_rack", "7"), c.StaticExtensions()); d != "" {
		t.Errorf("StaticExtensions (-want +got):\n%s", d)
	}
	// Pairs set in code (no file order) follow in key order.
	c.Extensions["b_code"], c.Extensions["a_code"] = "1", "2"
	if d := cmp.Diff(status.Pairs("zz_site", "north", "hardware_rev", "C2", "aa_rack", "7", "a_code", "2", "b_code", "1"), c.StaticExtensions()); d != "" {
		t.Errorf("StaticExtensions with code-set pairs (-want +got):\n%s", d)
	}
}

// The trust and space policy keys parse as written; an explicit reserve of 0 is kept, not
// replaced by the default.
func TestPolicyKeys(t *testing.T) {
	c, err := Parse([]byte("allow_any_trusted_key = true\nfree_space_reserve = 0\n" + minimal +
		"trusted_keys = [\"/etc/ota/keys/rootfs.pem\"]\nallow_any_trusted_key = false\n" +
		"[[target]]\nname = \"app\"\nkind = \"file\"\nfile_types = [1]\npath = \"/opt/app/a.tar\"\nallow_any_trusted_key = true\n"))
	if err != nil {
		t.Fatal(err)
	}
	got := []any{c.AllowAnyTrustedKey, c.Reserve(), c.Targets[0].TrustedKeys, c.Targets[0].AllowAnyTrustedKey, c.Targets[1].TrustedKeys, c.Targets[1].AllowAnyTrustedKey}
	want := []any{true, uint64(0), []string{"/etc/ota/keys/rootfs.pem"}, false, []string(nil), true}
	if d := cmp.Diff(want, got); d != "" {
		t.Errorf("(-want +got):\n%s", d)
	}
}
