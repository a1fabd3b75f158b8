package config

import (
	"bytes"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/BurntSushi/toml"
	"github.com/google/go-cmp/cmp"

	"github.com/gwota/gwota/status"
)

// FuzzParse: any bytes given as the writer's configuration are refused with an error or give
// a configuration that holds every invariant the writer relies on (it is the whole policy);
// never a panic. An accepted configuration also survives a TOML round trip unchanged.
func FuzzParse(f *testing.F) {
	f.Add([]byte(minimal))
	for _, p := range []string{"example.toml", "../../deploy/config/writer-uboot-emmc.toml", "../../deploy/config/writer-grub-x86.toml", "../../deploy/config/writer-app-bundle.toml"} {
		if b, err := os.ReadFile(p); err == nil {
			f.Add(bytes.ReplaceAll(b, []byte(`"ota-net"`), []byte(`"root"`)))
		}
	}
	f.Add([]byte("peer_uids = [4294967297]\n" + minimal))
	f.Add([]byte(minimal + `
[[target]]
name = "app"
kind = "file"
file_types = [1]
path = "/dev/mmcblk0p2/"
`))
	f.Add([]byte("max_block_size = 4194305\nsync_interval = \"-1s\"\n[boot]\nbackend = \"grub\"\ngrub_env = \"rel\"\n"))
	f.Add([]byte("[extensions]\n\"bad key\" = \"v\"\n[[check]]\nname = \"\"\ncommand = []\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := Parse(data)
		if err != nil {
			if c != nil {
				t.Fatal("configuration returned with an error")
			}
			return
		}
		checkInvariants(t, c)
		// Round trip: what the writer holds can be written down and reads back the same.
		var buf bytes.Buffer
		if err := toml.NewEncoder(&buf).Encode(c); err != nil {
			t.Fatalf("encode: %v", err)
		}
		c2, err := Parse(buf.Bytes())
		if err != nil {
			t.Fatalf("accepted configuration refused after a round trip: %v\n%s", err, buf.Bytes())
		}
		if d := cmp.Diff(c, c2); d != "" {
			t.Fatalf("round trip changed the configuration (-first +second):\n%s", d)
		}
	})
}

func checkInvariants(t *testing.T, c *Config) {
	t.Helper()
	fail := func(format string, args ...any) {
		t.Helper()
		t.Fatalf("accepted configuration breaks an invariant: "+format, args...)
	}
	if err := c.Validate(); err != nil {
		fail("Validate after Parse: %v", err)
	}
	if !filepath.IsAbs(c.Socket) || !filepath.IsAbs(c.StateDir) {
		fail("socket %q, state_dir %q", c.Socket, c.StateDir)
	}
	for _, u := range c.PeerUIDs {
		// uid_t is 32 bits and (uid_t)-1 means "no uid": anything else would wrap to
		// another user when the server converts it.
		if u < 0 || int64(u) >= math.MaxUint32 {
			fail("peer uid %d is not a uid", u)
		}
	}
	for _, k := range c.TrustedKeys {
		if !filepath.IsAbs(k) {
			fail("trusted key %q", k)
		}
	}
	if c.MaxBlockSize < MinBlockSize || c.MaxBlockSize > MaxMaxBlockSize {
		fail("max_block_size %d", c.MaxBlockSize)
	}
	if c.SyncBytes <= 0 || c.SyncInterval <= 0 || c.SelfTestTimeout <= 0 {
		fail("sync_bytes %d, sync_interval %v, self_test_timeout %v", c.SyncBytes, c.SyncInterval, c.SelfTestTimeout)
	}
	if c.VersionPolicy != VersionAny && c.VersionPolicy != VersionNewer && c.VersionPolicy != VersionNotSame {
		fail("version_policy %q", c.VersionPolicy)
	}
	if len(c.RebootCommand) > 0 && c.RebootCommand[0] == "" {
		fail("reboot_command %q", c.RebootCommand)
	}
	if c.Boot.BootLimit < 1 || c.Boot.BootLimit > 255 {
		fail("boot_limit %d", c.Boot.BootLimit)
	}
	switch c.Boot.Backend {
	case BootFile, BootUBoot:
	case BootGRUB:
		if !filepath.IsAbs(c.Boot.GrubEnv) {
			fail("grub_env %q", c.Boot.GrubEnv)
		}
	default:
		fail("boot backend %q", c.Boot.Backend)
	}
	names, types, paths, media := map[string]bool{}, map[int32]bool{}, map[string]bool{}, map[string]bool{}
	medium := func(p string) {
		p = filepath.Clean(p)
		if !filepath.IsAbs(p) || media[p] {
			fail("medium %q is relative or used twice", p)
		}
		media[p] = true
	}
	for _, tg := range c.Targets {
		if !nameRE.MatchString(tg.Name) || names[tg.Name] {
			fail("target name %q", tg.Name)
		}
		names[tg.Name] = true
		if len(tg.FileTypes)+len(tg.FilePaths) == 0 {
			fail("target %s is unreachable", tg.Name)
		}
		for _, ft := range tg.FileTypes {
			if ft < 0 || types[ft] {
				fail("file type %d", ft)
			}
			types[ft] = true
		}
		for _, fp := range tg.FilePaths {
			if fp == "" || paths[fp] {
				fail("file path %q", fp)
			}
			paths[fp] = true
		}
		switch tg.Kind {
		case KindAB:
			if len(tg.Slots) != 2 || tg.Path != "" {
				fail("ab target %s: slots %q path %q", tg.Name, tg.Slots, tg.Path)
			}
			medium(tg.Slots[0])
			medium(tg.Slots[1])
		case KindFile:
			if len(tg.Slots) != 0 || strings.HasSuffix(tg.Path, "/") {
				fail("file target %s: slots %q path %q", tg.Name, tg.Slots, tg.Path)
			}
			medium(tg.Path)
		default:
			fail("target kind %q", tg.Kind)
		}
	}
	for _, cmds := range [][]Command{c.Checks, c.ExtensionCommands} {
		seen := map[string]bool{}
		for _, cmd := range cmds {
			if !nameRE.MatchString(cmd.Name) || seen[cmd.Name] || len(cmd.Command) == 0 || cmd.Command[0] == "" || cmd.Timeout <= 0 {
				fail("command %+v", cmd)
			}
			seen[cmd.Name] = true
		}
	}
	for k := range c.Extensions {
		if !status.ValidKey(k) {
			fail("extension key %q", k)
		}
	}
}
