// Package deploy_test checks that the shipped example configurations load in
// the writer's own parser and agree with the units and drop-ins they are
// paired with: a slot the sandbox does not grant would fail only on a gateway.
package deploy_test

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/BurntSushi/toml"

	"github.com/gwota/gwota/writer/config"
)

// unitValues returns every value of key in a unit file (or drop-in), with
// repeated and space-separated assignments flattened.
func unitValues(t *testing.T, path, key string) []string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var vals []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		k, v, ok := strings.Cut(line, "=")
		if !ok || strings.HasPrefix(line, "#") || k != key {
			continue
		}
		vals = append(vals, v)
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return vals
}

func TestWriterExamples(t *testing.T) {
	listen := unitValues(t, "systemd/ota-writer.socket", "ListenStream")
	stateDirs := unitValues(t, "systemd/ota-writer.service", "StateDirectory")
	if len(listen) != 1 || len(stateDirs) != 1 {
		t.Fatalf("ListenStream=%q StateDirectory=%q: want one each", listen, stateDirs)
	}
	cases := []struct {
		config, dropin string
		backend        string
	}{
		{"writer-uboot-emmc.toml", "ota-writer-uboot-emmc.conf", config.BootUBoot},
		{"writer-grub-x86.toml", "ota-writer-grub-x86.conf", config.BootGRUB},
		{"writer-app-bundle.toml", "ota-writer-app-bundle.conf", config.BootFile},
	}
	for _, tc := range cases {
		t.Run(tc.config, func(t *testing.T) {
			cfg, err := loadExample(t, filepath.Join("config", tc.config))
			if err != nil {
				t.Fatal(err)
			}
			if cfg.Socket != listen[0] {
				t.Errorf("socket %q, ota-writer.socket listens on %q", cfg.Socket, listen[0])
			}
			if want := "/var/lib/" + stateDirs[0]; cfg.StateDir != want {
				t.Errorf("state_dir %q, the unit's StateDirectory is %q", cfg.StateDir, want)
			}
			if cfg.Boot.Backend != tc.backend {
				t.Errorf("boot backend %q, want %q", cfg.Boot.Backend, tc.backend)
			}
			if len(cfg.TrustedKeys) == 0 || len(cfg.PeerUIDs) == 0 {
				t.Error("an example without trusted_keys or peer_uids cannot update anything")
			}
			keys := slices.Clone(cfg.TrustedKeys)
			for _, tg := range cfg.Targets {
				keys = append(keys, tg.TrustedKeys...)
				if tg.AllowAnyTrustedKey {
					t.Errorf("target %s allows any trusted key: a shipped example keeps the fail-closed default", tg.Name)
				}
			}
			if cfg.AllowAnyTrustedKey {
				t.Error("allow_any_trusted_key: a shipped example keeps the fail-closed default")
			}
			for _, k := range keys {
				if !strings.HasPrefix(k, "/etc/ota/keys/") {
					t.Errorf("trusted key %q outside the root-only /etc/ota/keys", k)
				}
			}
			dropin := filepath.Join("systemd/examples", tc.dropin)
			var devices []string
			for _, v := range unitValues(t, dropin, "DeviceAllow") {
				dev, mode, _ := strings.Cut(v, " ")
				if mode != "rw" {
					t.Errorf("DeviceAllow=%s: want rw", v)
				}
				devices = append(devices, dev)
			}
			var rw []string
			for _, v := range unitValues(t, dropin, "ReadWritePaths") {
				for _, p := range strings.Fields(v) {
					rw = append(rw, strings.TrimPrefix(p, "-"))
				}
			}
			need := map[string]bool{} // every device the drop-in must grant
			for _, tg := range cfg.Targets {
				switch tg.Kind {
				case config.KindAB:
					for _, s := range tg.Slots {
						need[s] = true
					}
				case config.KindFile:
					if !slices.Contains(rw, filepath.Dir(tg.Path)) {
						t.Errorf("target %s: %s not in ReadWritePaths=%q", tg.Name, filepath.Dir(tg.Path), rw)
					}
				}
			}
			switch cfg.Boot.Backend {
			case config.BootUBoot:
				for _, d := range fwEnvDevices(t, filepath.Join("config", filepath.Base(cfg.Boot.FwEnvConfig))) {
					need[d] = true
				}
				if !slices.Contains(rw, "/run/lock") {
					t.Error("uboot: libubootenv locks /var/lock/fw_printenv.lock; /run/lock not writable")
				}
			case config.BootGRUB:
				if !slices.Contains(rw, filepath.Dir(cfg.Boot.GrubEnv)) {
					t.Errorf("grub: %s not in ReadWritePaths=%q", filepath.Dir(cfg.Boot.GrubEnv), rw)
				}
			}
			for d := range need {
				if !slices.Contains(devices, d) {
					t.Errorf("%s is used by the configuration but not granted by DeviceAllow=%q", d, devices)
				}
			}
			for _, d := range devices {
				if !need[d] {
					t.Errorf("DeviceAllow=%s grants a device the configuration does not use", d)
				}
			}
		})
	}
}

func fwEnvDevices(t *testing.T, path string) []string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var devs []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) >= 3 && !strings.HasPrefix(f[0], "#") && !slices.Contains(devs, f[0]) {
			devs = append(devs, f[0])
		}
	}
	if len(devs) == 0 {
		t.Fatalf("%s names no device", path)
	}
	return devs
}

// TestNetExample checks net.toml against the service it is written for and,
// through the real binary, against ota-net's own loader.
func TestNetExample(t *testing.T) {
	var n struct {
		Broker       string `toml:"broker"`
		CAFile       string `toml:"ca_file"`
		CertFile     string `toml:"cert_file"`
		KeyFile      string `toml:"key_file"`
		WriterSocket string `toml:"writer_socket"`
		StateDir     string `toml:"state_dir"`
	}
	if _, err := toml.DecodeFile("config/net.toml", &n); err != nil {
		t.Fatal(err)
	}
	if listen := unitValues(t, "systemd/ota-writer.socket", "ListenStream"); n.WriterSocket != listen[0] {
		t.Errorf("writer_socket %q, the socket unit listens on %q", n.WriterSocket, listen[0])
	}
	if sd := unitValues(t, "systemd/ota-net.service", "StateDirectory"); n.StateDir != "/var/lib/"+sd[0] {
		t.Errorf("state_dir %q, the unit's StateDirectory is %q", n.StateDir, sd[0])
	}
	// The TLS files come from LoadCredential=tls:/etc/ota/net.
	cred := unitValues(t, "systemd/ota-net.service", "LoadCredential")
	if len(cred) != 1 {
		t.Fatalf("LoadCredential=%q, want one", cred)
	}
	id, _, _ := strings.Cut(cred[0], ":")
	for _, p := range []string{n.CAFile, n.CertFile, n.KeyFile} {
		if !strings.HasPrefix(p, "/run/credentials/ota-net.service/"+id+"_") {
			t.Errorf("%s is not a credential of ota-net.service (%s_*)", p, id)
		}
	}

	// ota-net's loader is in its main package: run the binary. A configuration
	// it accepts gets as far as opening the CA file, which exists only under
	// systemd; a refused one stops earlier with exit status 2.
	if testing.Short() {
		t.Skip("builds ota-net")
	}
	bin := filepath.Join(t.TempDir(), "ota-net")
	if out, err := exec.Command("go", "build", "-o", bin, "../cmd/ota-net").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, bin, "--config", "config/net.toml").CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 1 || !strings.Contains(string(out), n.CAFile+": no such file") {
		t.Errorf("ota-net --config config/net.toml: %v, want exit 1 opening %s; output:\n%s", err, n.CAFile, out)
	}
}

// loadExample parses a writer example with the writer's own parser. The examples name the
// ota-net user that the package's sysusers entry creates; on a machine without it (a fresh
// CI machine before the privilege-split test ran) that name stands for "nobody", so the rest
// of the file is still checked.
func loadExample(t *testing.T, path string) (*config.Config, error) {
	t.Helper()
	if _, err := user.Lookup("ota-net"); err == nil {
		return config.Load(path)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	if !bytes.Contains(b, []byte(`peer_users = ["ota-net"]`)) {
		t.Fatalf("%s: no peer_users = [\"ota-net\"] line", path)
	}
	t.Logf("no ota-net user here: checking %s with peer_users = [\"nobody\"]", path)
	return config.Parse(bytes.Replace(b, []byte(`peer_users = ["ota-net"]`), []byte(`peer_users = ["nobody"]`), 1))
}

// TestExamplesRunningSlot: the bootloader examples take the running slot from the kernel
// command line, with a root= value per slot that designates exactly that slot's partition,
// and the writer's sandbox leaves /proc/cmdline readable.
func TestExamplesRunningSlot(t *testing.T) {
	for _, v := range unitValues(t, "systemd/ota-writer.service", "ProcSubset") {
		if v != "all" {
			t.Errorf("ota-writer.service: ProcSubset=%s hides /proc/cmdline, where the running slot is read", v)
		}
	}
	// root= spellings of a partition, by the node the configuration names for it.
	rootValues := func(slot string) []string {
		vals := []string{slot}
		for prefix, tag := range map[string]string{"/dev/disk/by-partlabel/": "PARTLABEL=", "/dev/disk/by-partuuid/": "PARTUUID="} {
			if strings.HasPrefix(slot, prefix) {
				vals = append(vals, tag+strings.TrimPrefix(slot, prefix))
			}
		}
		return vals
	}
	for _, name := range []string{"writer-uboot-emmc.toml", "writer-grub-x86.toml"} {
		t.Run(name, func(t *testing.T) {
			cfg, err := loadExample(t, filepath.Join("config", name))
			if err != nil {
				t.Fatal(err)
			}
			if cfg.Boot.SlotFromCmdline != "root" {
				t.Fatalf("slot_from_cmdline %q, want the production setting \"root\"", cfg.Boot.SlotFromCmdline)
			}
			var ab []config.Target
			for _, tg := range cfg.Targets {
				if tg.Kind == config.KindAB {
					ab = append(ab, tg)
				}
			}
			if len(ab) != 1 {
				t.Fatalf("%d A/B targets, want 1", len(ab))
			}
			for i, slot := range []string{"a", "b"} {
				got := cfg.Boot.CmdlineSlotValues[slot]
				if want := rootValues(ab[0].Slots[i]); !slices.Contains(want, got) {
					t.Errorf("cmdline_slot_values.%s = %q does not designate slot %s (%s): want one of %q", slot, got, slot, ab[0].Slots[i], want)
				}
			}
		})
	}
}

// TestNetProxyDropIn: the proxy drop-in resets ota-net's IP allow list to one address, and
// its credential is the file name a relative password_file reads from $CREDENTIALS_DIRECTORY
// (netagent/webproxy TestResolve, test/e2e TestProxyBasicAuth).
func TestNetProxyDropIn(t *testing.T) {
	const dropIn = "systemd/examples/ota-net-proxy.conf"
	allow := unitValues(t, dropIn, "IPAddressAllow")
	if len(allow) != 2 || allow[0] != "" || !strings.HasSuffix(allow[1], "/32") {
		t.Errorf("IPAddressAllow=%q: want the reset, then the proxy's one address", allow)
	}
	cred := unitValues(t, dropIn, "LoadCredential")
	if len(cred) != 1 || !strings.HasPrefix(cred[0], "proxy-password:/etc/ota/") {
		t.Errorf("LoadCredential=%q, want proxy-password:/etc/ota/...", cred)
	}
	doc, err := os.ReadFile("../docs/PROXY.md")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(doc), `password_file = "proxy-password"`) {
		t.Error(`docs/PROXY.md does not configure password_file = "proxy-password"`)
	}
}
